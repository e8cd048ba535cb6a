package vault

import (
	"context"
	"fmt"
)

// Peer is one Raft server of the cluster configuration.
type Peer struct {
	NodeID  string `json:"node_id"`
	Address string `json:"address"`
	Leader  bool   `json:"leader"`
	Voter   bool   `json:"voter"`
}

// RaftPeers lists the Raft configuration with tok (the operator token).
func (n *Node) RaftPeers(ctx context.Context, tok Token) ([]Peer, error) {
	c, err := n.withToken(tok)
	if err != nil {
		return nil, err
	}
	sec, err := c.Logical().ReadWithContext(ctx, "sys/storage/raft/configuration")
	if err != nil {
		return nil, n.tokenError("raft configuration", err)
	}
	if sec == nil || sec.Data == nil {
		return nil, fmt.Errorf("%s: raft configuration: empty answer (is this Vault on Raft storage?)", n.Name)
	}
	var peers []Peer
	cfg, _ := sec.Data["config"].(map[string]any)
	servers, _ := cfg["servers"].([]any)
	for _, s := range servers {
		m, _ := s.(map[string]any)
		p := Peer{}
		p.NodeID, _ = m["node_id"].(string)
		p.Address, _ = m["address"].(string)
		p.Leader, _ = m["leader"].(bool)
		p.Voter, _ = m["voter"].(bool)
		peers = append(peers, p)
	}
	return peers, nil
}

// RemovePeer removes a stale Raft server with tok.
func (n *Node) RemovePeer(ctx context.Context, tok Token, id string) error {
	return n.Write(ctx, tok, "sys/storage/raft/remove-peer", map[string]any{"server_id": id})
}

// Autopilot is the part of autopilot's state an upgrade waits on.
type Autopilot struct {
	Healthy bool
	Leader  string
	// Servers by node id: healthy, voter, status (leader, voter, non-voter).
	Servers map[string]AutopilotServer
}

// AutopilotServer is one server as autopilot sees it.
type AutopilotServer struct {
	Healthy bool   `json:"healthy"`
	Status  string `json:"status"`
	Voter   bool   `json:"voter"`
}

// Autopilot reads sys/storage/raft/autopilot/state with tok.
func (n *Node) Autopilot(ctx context.Context, tok Token) (Autopilot, error) {
	c, err := n.withToken(tok)
	if err != nil {
		return Autopilot{}, err
	}
	st, err := c.Sys().RaftAutopilotStateWithContext(ctx)
	if err != nil {
		return Autopilot{}, n.tokenError("autopilot state", err)
	}
	if st == nil {
		return Autopilot{}, fmt.Errorf("%s: autopilot state: empty answer", n.Name)
	}
	out := Autopilot{Healthy: st.Healthy, Leader: st.Leader, Servers: map[string]AutopilotServer{}}
	voters := map[string]bool{}
	for _, v := range st.Voters {
		voters[v] = true
	}
	for id, s := range st.Servers {
		if s == nil {
			continue
		}
		out.Servers[id] = AutopilotServer{Healthy: s.Healthy, Status: s.Status, Voter: voters[id] || s.Status == "voter" || s.Status == "leader"}
	}
	return out, nil
}

// StepDown asks the active node to give up leadership, with tok.
func (n *Node) StepDown(ctx context.Context, tok Token) error {
	c, err := n.withToken(tok)
	if err != nil {
		return err
	}
	if err := c.Sys().StepDownWithContext(ctx); err != nil {
		return n.tokenError("step down", err)
	}
	return nil
}

// RaftIndex is the Raft index this node has applied, from sys/leader (which needs no
// token). After a snapshot restore it is above the snapshot's own index: Raft installs a
// restored snapshot at max(its index, the last index)+1.
func (n *Node) RaftIndex(ctx context.Context) (uint64, error) {
	l, err := n.client.Sys().LeaderWithContext(ctx)
	if err != nil {
		return 0, fmt.Errorf("%s: leader: %w", n.Name, err)
	}
	return l.RaftAppliedIndex, nil
}

package vault

import (
	"context"
	"fmt"
	"io"
)

// RestoreSnapshot uploads a Raft snapshot with admin (a generated root token). force
// restores a snapshot of another cluster (snapshot-force): Vault then seals and opens
// only with the keys of the snapshot's cluster.
func (n *Node) RestoreSnapshot(ctx context.Context, admin Token, r io.Reader, force bool) error {
	c, err := n.withToken(admin)
	if err != nil {
		return err
	}
	if err := c.Sys().RaftSnapshotRestoreWithContext(ctx, r, force); err != nil {
		return fmt.Errorf("%s: restore snapshot: %w", n.Name, err)
	}
	return nil
}

// Peer is one Raft server of the cluster configuration.
type Peer struct {
	NodeID  string `json:"node_id"`
	Address string `json:"address"`
	Leader  bool   `json:"leader"`
	Voter   bool   `json:"voter"`
}

// RaftPeers lists the Raft configuration with admin.
func (n *Node) RaftPeers(ctx context.Context, admin Token) ([]Peer, error) {
	c, err := n.withToken(admin)
	if err != nil {
		return nil, err
	}
	sec, err := c.Logical().ReadWithContext(ctx, "sys/storage/raft/configuration")
	if err != nil {
		return nil, fmt.Errorf("%s: raft configuration: %w", n.Name, err)
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

// RemovePeer removes a stale Raft server with admin.
func (n *Node) RemovePeer(ctx context.Context, admin Token, id string) error {
	return n.Write(ctx, admin, "sys/storage/raft/remove-peer", map[string]any{"server_id": id})
}

// Read returns the "value" field at path (tests and checks after a restore).
func (n *Node) Read(ctx context.Context, admin Token, path string) (string, error) {
	c, err := n.withToken(admin)
	if err != nil {
		return "", err
	}
	sec, err := c.Logical().ReadWithContext(ctx, path)
	if err != nil {
		return "", fmt.Errorf("%s: read %s: %w", n.Name, path, err)
	}
	if sec == nil {
		return "", fmt.Errorf("%s: %s not found", n.Name, path)
	}
	v, _ := sec.Data["value"].(string)
	return v, nil
}

package provision

import (
	"context"
	"net"
)

// DialContext opens a TCP connection from the node to addr through the SSH connection
// (a direct-tcpip channel): how the agent reaches a pod IP that only the node can route
// to, sealed and NotReady pods included.
func (c *Conn) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return c.client.DialContext(ctx, network, addr)
}

// Alive reports whether the connection still answers a keepalive request.
func (c *Conn) Alive() bool {
	_, _, err := c.client.SendRequest("keepalive@openssh.com", true, nil)
	return err == nil
}

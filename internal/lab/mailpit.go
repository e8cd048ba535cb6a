package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// Mailpit is the lab's real SMTP server (github.com/axllent/mailpit) on 127.0.0.1 with a
// certificate from the lab's own CA (CAFile), requiring a login (User, Password) and,
// by TLS mode, STARTTLS ("starttls"), TLS from the first byte ("implicit") or nothing
// ("none"). What arrived is read back through its API.
type Mailpit struct {
	Host     string
	Port     int
	CAFile   string
	User     string
	Password string
	api      string
	args     []string
	bin      string
	dir      string
	proc     *Process
}

// StartMailpit starts Mailpit until the test ends.
func StartMailpit(t testing.TB, bins Bins, tlsMode string) *Mailpit {
	t.Helper()
	m, err := NewMailpit(t.TempDir(), bins, tlsMode)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Stop)
	return m
}

// NewMailpit starts Mailpit with its state in dir; Stop ends it.
func NewMailpit(dir string, bins Bins, tlsMode string) (*Mailpit, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ca, err := NewCA("pva-lab-mail-ca")
	if err != nil {
		return nil, err
	}
	kp, err := ca.Issue("127.0.0.1", nil, []string{"127.0.0.1", "localhost"}, true)
	if err != nil {
		return nil, err
	}
	m := &Mailpit{Host: "127.0.0.1", CAFile: filepath.Join(dir, "ca.pem"), User: "pva", Password: "mail-" + RunID() + "-password", bin: bins.Mailpit, dir: dir}
	if err := writeFiles(dir, map[string][]byte{"ca.pem": ca.CertPEM, "smtp.crt": kp.CertPEM, "smtp.key": kp.KeyPEM,
		"auth": []byte(m.User + ":" + m.Password + "\n")}); err != nil {
		return nil, err
	}
	if m.Port, err = FreePort("127.0.0.1"); err != nil {
		return nil, err
	}
	apiPort, err := FreePort("127.0.0.1")
	if err != nil {
		return nil, err
	}
	m.api = "http://127.0.0.1:" + strconv.Itoa(apiPort)
	m.args = []string{"--smtp", net.JoinHostPort(m.Host, strconv.Itoa(m.Port)), "--listen", "127.0.0.1:" + strconv.Itoa(apiPort),
		"--database", filepath.Join(dir, "mailpit.db"), "--disable-version-check", "--smtp-disable-rdns",
		"--smtp-auth-file", filepath.Join(dir, "auth")}
	switch tlsMode {
	case "starttls":
		m.args = append(m.args, "--smtp-tls-cert", filepath.Join(dir, "smtp.crt"), "--smtp-tls-key", filepath.Join(dir, "smtp.key"), "--smtp-require-starttls")
	case "implicit":
		m.args = append(m.args, "--smtp-tls-cert", filepath.Join(dir, "smtp.crt"), "--smtp-tls-key", filepath.Join(dir, "smtp.key"), "--smtp-require-tls")
	default:
		m.args = append(m.args, "--smtp-auth-allow-insecure")
	}
	if err := m.Start(); err != nil {
		return nil, err
	}
	return m, nil
}

// Start starts (or starts again) the server with its messages kept.
func (m *Mailpit) Start() error {
	p, err := startProcess("mailpit", filepath.Join(m.dir, "mailpit.log"), m.bin, m.args, nil, nil)
	if err != nil {
		return err
	}
	m.proc = p
	err = WaitFor(context.Background(), 20*time.Second, "mailpit", func(ctx context.Context) error {
		if err := p.errIfExited(); err != nil {
			return err
		}
		_, err := m.Messages(ctx)
		return err
	})
	if err != nil {
		p.Kill()
	}
	return err
}

// Stop stops the server: connections to its SMTP port are refused.
func (m *Mailpit) Stop() {
	if m.proc != nil {
		m.proc.Stop()
		m.proc = nil
	}
}

// Mail is one message that arrived.
type Mail struct {
	ID      string
	Subject string
	From    string
	To      []string
	Text    string
	Created time.Time
}

// Messages lists what arrived, oldest first, with each text.
func (m *Mailpit) Messages(ctx context.Context) ([]Mail, error) {
	var list struct {
		Messages []struct {
			ID      string
			Subject string
			Created time.Time
			From    struct{ Address string }
			To      []struct{ Address string }
		}
	}
	if err := m.get(ctx, "/api/v1/messages?limit=500", &list); err != nil {
		return nil, err
	}
	out := make([]Mail, 0, len(list.Messages))
	for i := len(list.Messages) - 1; i >= 0; i-- { // the API lists newest first
		l := list.Messages[i]
		var msg struct{ Text string }
		if err := m.get(ctx, "/api/v1/message/"+l.ID, &msg); err != nil {
			return nil, err
		}
		mail := Mail{ID: l.ID, Subject: l.Subject, From: l.From.Address, Text: msg.Text, Created: l.Created}
		for _, to := range l.To {
			mail.To = append(mail.To, to.Address)
		}
		out = append(out, mail)
	}
	return out, nil
}

func (m *Mailpit) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.api+path, nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("mailpit %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// Log is the server's log (refused logins, TLS errors).
func (m *Mailpit) Log() string {
	b, err := os.ReadFile(filepath.Join(m.dir, "mailpit.log"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err.Error()
	}
	return string(b)
}

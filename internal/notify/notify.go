// Package notify delivers the daemon's messages to the operator: mail over SMTP
// (STARTTLS or implicit TLS), a signed JSON webhook, and the push services homelabs use
// (ntfy, Gotify, Discord, Telegram, Matrix …) through shoutrrr. Every delivery is bounded
// by its context; errors never carry a password, key or service token.
package notify

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"
)

// Kind says what a message reports.
type Kind string

const (
	Failing   Kind = "failing"   // a condition started failing
	Reminder  Kind = "reminder"  // it still fails
	Recovered Kind = "recovered" // it works again
	Event     Kind = "event"     // something happened once (the daemon restarted after a crash)
	Test      Kind = "test"      // notify test
)

// Message is one notification.
type Message struct {
	Event   string    `json:"event"`   // backup, offsite, drill, token, unseal_refused, sealed, restarted, keyfile, test
	Subject string    `json:"subject"` // what it is about: a pod, a target, a token
	Kind    Kind      `json:"kind"`
	Text    string    `json:"text"`
	Host    string    `json:"host"`
	At      time.Time `json:"at"`
	// Since is when the failure began (reminders and recoveries).
	Since time.Time `json:"failing_since,omitzero"`
	// Dropped is how many messages to this target the rate limit dropped before this one.
	Dropped int `json:"dropped_before,omitempty"`
}

// Title is the message's one-line summary (a mail's subject).
func (m Message) Title() string {
	word := map[Kind]string{Failing: "FAILING", Reminder: "STILL FAILING", Recovered: "recovered", Event: "event", Test: "test"}[m.Kind]
	return fmt.Sprintf("[pve-vault-agent %s] %s: %s %s", m.Host, word, m.Event, m.Subject)
}

// Body is the message's text.
func (m Message) Body() string {
	var b strings.Builder
	b.WriteString(m.Text)
	b.WriteString("\n\n")
	fmt.Fprintf(&b, "host: %s\nevent: %s\nsubject: %s\nstate: %s\nat: %s\n", m.Host, m.Event, m.Subject, m.Kind, m.At.UTC().Format(time.RFC3339))
	if !m.Since.IsZero() && m.Kind != Failing {
		fmt.Fprintf(&b, "failing since: %s (%s)\n", m.Since.UTC().Format(time.RFC3339), m.At.Sub(m.Since).Round(time.Second))
	}
	if m.Dropped > 0 {
		fmt.Fprintf(&b, "%d earlier message(s) were dropped by notify.max_per_hour\n", m.Dropped)
	}
	b.WriteString("\nstatus: pve-vault-agent status; log: journalctl -u pve-vault-agent\n")
	return b.String()
}

// Sender delivers messages to one target.
type Sender interface {
	Name() string
	Send(ctx context.Context, m Message) error
}

// rootCAs is the system pool, or only the CA in file.
func rootCAs(file string) (*x509.CertPool, error) {
	if file == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", file)
	}
	return pool, nil
}

func tlsConfig(host, caFile string) (*tls.Config, error) {
	pool, err := rootCAs(caFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{ServerName: host, RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// scrubbed replaces every secret in err's text.
func scrubbed(err error, secrets ...string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	changed := false
	for _, s := range secrets {
		if len(s) >= 4 && strings.Contains(msg, s) {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
			changed = true
		}
	}
	if !changed {
		return err
	}
	return errors.New(msg)
}

// urlSecrets lists the parts of a service URL that may be a secret: the user info, the
// path segments and the query values (a bot token, a topic, a password).
func urlSecrets(raw string) []string {
	out := []string{raw}
	u, err := url.Parse(raw)
	if err != nil {
		return out
	}
	if u.User != nil {
		out = append(out, u.User.String(), u.User.Username())
		if p, ok := u.User.Password(); ok {
			out = append(out, p, url.QueryEscape(p))
		}
	}
	for _, seg := range strings.Split(u.Path, "/") {
		if len(seg) >= 8 {
			out = append(out, seg)
		}
	}
	for _, vs := range u.Query() {
		for _, v := range vs {
			if len(v) >= 8 {
				out = append(out, v, url.QueryEscape(v))
			}
		}
	}
	return out
}

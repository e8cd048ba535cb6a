package notify

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pve-vault-agent/pve-vault-agent/internal/lab"
)

func TestMain(m *testing.M) { os.Exit(lab.RunTests(m)) }

// Mail through a real server (Mailpit) in each TLS mode, with its login: delivered and
// read back; a server that does not offer STARTTLS is refused rather than spoken to in
// clear text; a wrong password, a certificate from another CA and a server that accepts
// and then says nothing are errors within the deadline, never with the password in them.
func TestSMTPModes(t *testing.T) {
	bins := lab.Need(t)
	msg := Message{Event: "backup", Subject: "scheduled backup", Kind: Failing, Text: "the scheduled backup stored nothing", Host: "pve1", At: time.Now()}
	send := func(s *SMTP) error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		return s.Send(ctx, msg)
	}
	for _, mode := range []string{"starttls", "implicit", "none"} {
		t.Run(mode, func(t *testing.T) {
			m := lab.StartMailpit(t, bins, mode)
			s := &SMTP{Target: "mail", Host: m.Host, Port: m.Port, TLS: mode, Username: m.User, Password: m.Password,
				From: "pva@lab.test", To: []string{"ops@lab.test", "oncall@lab.test"}, CAFile: m.CAFile}
			if err := send(s); err != nil {
				t.Fatal(err)
			}
			got, err := m.Messages(context.Background())
			if err != nil || len(got) != 1 {
				t.Fatalf("%d messages, %v", len(got), err)
			}
			if got[0].Subject != msg.Title() || !strings.Contains(got[0].Text, "the scheduled backup stored nothing") || len(got[0].To) != 2 {
				t.Fatalf("arrived: %+v", got[0])
			}
			bad := *s
			bad.Password = "wrong-" + m.Password
			if err := send(&bad); err == nil || strings.Contains(err.Error(), bad.Password) {
				t.Fatalf("wrong password: %v", err)
			}
			if mode == "none" {
				// No certificate: no STARTTLS on offer; a starttls target refuses to go on.
				strict := *s
				strict.TLS = "starttls"
				if err := send(&strict); err == nil || !strings.Contains(err.Error(), "offers no STARTTLS") {
					t.Fatalf("starttls to a server without it: %v", err)
				}
				return
			}
			other := *s
			other.CAFile = ""
			if err := send(&other); err == nil || !strings.Contains(err.Error(), "certificate") {
				t.Fatalf("a certificate the system CAs do not know: %v", err)
			}
		})
	}

	// A server that accepts the connection and never speaks.
	port := lab.ListenSilent(t, "127.0.0.1:0").Addr().(*net.TCPAddr).Port
	t0 := time.Now()
	err := send(&SMTP{Target: "hung", Host: "127.0.0.1", Port: port, TLS: "starttls", Username: "u", Password: "hung-password", From: "a@b", To: []string{"c@d"}})
	if err == nil || time.Since(t0) > 4*time.Second || strings.Contains(err.Error(), "hung-password") {
		t.Fatalf("hung server: %v after %s", err, time.Since(t0))
	}
}

// Secrets of a service URL never appear in an error.
func TestShoutrrrErrorsHideTheToken(t *testing.T) {
	// ntfy with a login and a topic that is itself a secret, at a port nothing listens on.
	s := &Shoutrrr{Target: "phone", URL: "ntfy://pva:AAHsecretTOKENvalue@127.0.0.1:1/secret-topic-name?scheme=http"}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.Send(ctx, Message{Event: "test", Kind: Test, At: time.Now()})
	if err == nil {
		t.Fatal("ntfy reached at a closed port")
	}
	if strings.Contains(err.Error(), "AAHsecretTOKENvalue") || strings.Contains(err.Error(), "secret-topic-name") {
		t.Fatalf("the token is in the error: %v", err)
	}
	if err := (&Shoutrrr{URL: "nosuchservice://x"}).Check(); err == nil {
		t.Fatal("an unknown service was accepted")
	}
}

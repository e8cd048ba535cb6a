package notify

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/smtp"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/nicholas-fedor/shoutrrr"
	"github.com/nicholas-fedor/shoutrrr/pkg/types"
)

// SMTP sends mail. TLS is "starttls" (required: a server that does not offer it is an
// error, never a fallback to clear text), "implicit" (TLS from the first byte, port 465)
// or "none" (a relay on loopback).
type SMTP struct {
	Target   string
	Host     string
	Port     int
	TLS      string
	Username string
	Password string
	From     string
	To       []string
	CAFile   string
}

// Name is the target's name.
func (s *SMTP) Name() string { return s.Target }

// Send delivers m as a plain-text mail; the whole exchange is bounded by ctx's deadline.
func (s *SMTP) Send(ctx context.Context, m Message) error {
	err := s.send(ctx, m)
	return scrubbed(err, s.Password)
}

func (s *SMTP) send(ctx context.Context, m Message) error {
	tcfg, err := tlsConfig(s.Host, s.CAFile)
	if err != nil {
		return err
	}
	addr := net.JoinHostPort(s.Host, strconv.Itoa(s.Port))
	var conn net.Conn
	if s.TLS == "implicit" {
		conn, err = (&tls.Dialer{Config: tcfg}).DialContext(ctx, "tcp", addr)
	} else {
		conn, err = (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return fmt.Errorf("connect to %s: %w", addr, err)
	}
	// net/smtp has no context: the deadline bounds every read and write, so a server that
	// accepts and then says nothing cannot hold the sender.
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	c, err := smtp.NewClient(conn, s.Host)
	if err != nil {
		conn.Close()
		return fmt.Errorf("%s: greeting: %w", addr, err)
	}
	defer c.Close()
	host, _ := os.Hostname()
	if err := c.Hello(host); err != nil {
		return fmt.Errorf("%s: EHLO: %w", addr, err)
	}
	if s.TLS == "starttls" {
		if ok, _ := c.Extension("STARTTLS"); !ok {
			return fmt.Errorf("%s offers no STARTTLS: not sending in clear text (tls: implicit for port 465, or none only to a loopback relay)", addr)
		}
		if err := c.StartTLS(tcfg); err != nil {
			return fmt.Errorf("%s: STARTTLS: %w", addr, err)
		}
	}
	if s.Username != "" {
		if err := c.Auth(smtp.PlainAuth("", s.Username, s.Password, s.Host)); err != nil {
			return fmt.Errorf("%s: login as %s: %w", addr, s.Username, err)
		}
	}
	if err := c.Mail(s.From); err != nil {
		return fmt.Errorf("%s: MAIL FROM: %w", addr, err)
	}
	for _, to := range s.To {
		if err := c.Rcpt(to); err != nil {
			return fmt.Errorf("%s: RCPT TO %s: %w", addr, to, err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("%s: DATA: %w", addr, err)
	}
	if _, err := w.Write(s.mail(m)); err != nil {
		return fmt.Errorf("%s: write the message: %w", addr, err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("%s: the server did not take the message: %w", addr, err)
	}
	return c.Quit()
}

func (s *SMTP) mail(m Message) []byte {
	id := make([]byte, 12)
	_, _ = rand.Read(id)
	domain := s.From[strings.LastIndexByte(s.From, '@')+1:]
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: %s\r\nTo: %s\r\nSubject: %s\r\nDate: %s\r\nMessage-ID: <%s@%s>\r\n", s.From, strings.Join(s.To, ", "),
		mime.QEncoding.Encode("utf-8", m.Title()), m.At.Format(time.RFC1123Z), hex.EncodeToString(id), domain)
	b.WriteString("Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
	b.WriteString(strings.ReplaceAll(m.Body(), "\n", "\r\n"))
	return b.Bytes()
}

// Webhook POSTs the message as JSON. With a key, X-PVA-Signature carries
// sha256=<hex HMAC-SHA256 over X-PVA-Timestamp, ".", and the body>, so a receiver can
// check the sender and refuse a replay.
type Webhook struct {
	Target string
	URL    string
	Key    []byte
	CAFile string
}

// Name is the target's name.
func (w *Webhook) Name() string { return w.Target }

// Sign is the signature header value for ts and body.
func Sign(key []byte, ts string, body []byte) string {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(ts))
	mac.Write([]byte("."))
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// Send posts m; anything but a 2xx answer is an error.
func (w *Webhook) Send(ctx context.Context, m Message) error {
	body, err := json.Marshal(m)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "pve-vault-agent")
	if len(w.Key) > 0 {
		ts := strconv.FormatInt(m.At.Unix(), 10)
		req.Header.Set("X-PVA-Timestamp", ts)
		req.Header.Set("X-PVA-Signature", Sign(w.Key, ts, body))
	}
	tcfg, err := tlsConfig(req.URL.Hostname(), w.CAFile)
	if err != nil {
		return err
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tcfg, Proxy: http.ProxyFromEnvironment}}
	resp, err := client.Do(req)
	if err != nil {
		return scrubbed(err, urlSecrets(w.URL)...)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("webhook %s answered %s", w.Target, resp.Status)
	}
	return nil
}

// Shoutrrr sends through a shoutrrr service URL (ntfy://…, gotify://…, discord://…,
// telegram://…, matrix://…). The library has no context: the send runs beside the
// caller, which stops waiting at ctx's deadline (the services' own HTTP timeouts end it).
type Shoutrrr struct {
	Target string
	URL    string
}

// Name is the target's name.
func (s *Shoutrrr) Name() string { return s.Target }

// Check parses the URL (a service shoutrrr does not know, or a malformed URL).
func (s *Shoutrrr) Check() error {
	_, err := shoutrrr.CreateSender(s.URL)
	return scrubbed(err, urlSecrets(s.URL)...)
}

// Send delivers m's title and body.
func (s *Shoutrrr) Send(ctx context.Context, m Message) error {
	sender, err := shoutrrr.CreateSender(s.URL)
	if err != nil {
		return scrubbed(err, urlSecrets(s.URL)...)
	}
	done := make(chan error, 1)
	go func() {
		done <- errors.Join(sender.Send(m.Body(), &types.Params{"title": m.Title()})...)
	}()
	select {
	case err = <-done:
		return scrubbed(err, urlSecrets(s.URL)...)
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", s.Target, ctx.Err())
	}
}

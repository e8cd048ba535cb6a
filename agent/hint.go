package agent

import (
	"errors"
	"fmt"
)

// hinted is an error with what the operator should do about it, kept apart from the
// message so the CLI prints it on its own "hint:" line.
type hinted struct {
	err  error
	hint string
}

func (h *hinted) Error() string { return h.err.Error() }
func (h *hinted) Unwrap() error { return h.err }
func (h *hinted) Hint() string  { return h.hint }

// withHint attaches a hint to err (nil stays nil).
func withHint(err error, format string, a ...any) error {
	if err == nil {
		return nil
	}
	return &hinted{err: err, hint: fmt.Sprintf(format, a...)}
}

// hintf is a new error with a hint.
func hintf(hint, format string, a ...any) error {
	return &hinted{err: fmt.Errorf(format, a...), hint: hint}
}

// Hints collects the hints anywhere in err's chain (any error with a Hint() string
// method, whichever package made it), outermost first, without repeats.
func Hints(err error) []string {
	var out []string
	seen := map[string]bool{}
	var walk func(error)
	walk = func(e error) {
		if e == nil {
			return
		}
		if h, ok := e.(interface{ Hint() string }); ok {
			if s := h.Hint(); s != "" && !seen[s] {
				seen[s] = true
				out = append(out, s)
			}
		}
		switch u := e.(type) {
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		case interface{ Unwrap() []error }:
			for _, x := range u.Unwrap() {
				walk(x)
			}
		}
	}
	walk(err)
	return out
}

// is reports errors.Is for any of targets.
func isAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}

// Refused reports whether err is a refusal made before anything was changed: the CLI
// says so, so the operator knows a re-run after the fix starts from a clean state.
func Refused(err error) bool {
	return isAny(err, ErrUnknownKeyset, ErrNoSnapshot, ErrBusy, ErrInitKeyfileExists, ErrInitInitialised)
}

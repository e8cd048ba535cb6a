package agent

import "os"

var osGetpid = os.Getpid

func removeAll(p string) error { return os.RemoveAll(p) }

func writeFile(p, s string) error { return os.WriteFile(p, []byte(s), 0o600) }

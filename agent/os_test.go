package agent

import "os"

var osGetpid = os.Getpid

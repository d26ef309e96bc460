package server

import (
	"bufio"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The container's cgroup counts its OOM kills; a command killed by SIGKILL
// while that count rose was (most likely) the OOM killer's victim. The agent
// sees its own cgroup at these paths (cgroup namespace, v2 then v1).
var oomFiles = []string{"/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"}

func oomKills() int64 {
	for _, p := range oomFiles {
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "oom_kill "); ok {
				n, _ := strconv.ParseInt(v, 10, 64)
				_ = f.Close()
				return n
			}
		}
		_ = f.Close()
	}
	return -1
}

func oomKilled(ws unix.WaitStatus, before int64) bool {
	if before < 0 || !ws.Signaled() || ws.Signal() != unix.SIGKILL {
		return false
	}
	return oomKills() > before
}

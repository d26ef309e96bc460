package server

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
)

// An orphan (the command's background child, re-parented to the agent as
// subreaper here, as init in a container) is reaped: it does not stay a zombie.
func TestOrphansAreReaped(t *testing.T) {
	a := newAgent(t)
	resp, err := a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer,
		Command: sh("sleep 0.2 >/dev/null 2>&1 & echo $!")})
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(resp.Stdout)))
	if err != nil {
		t.Fatal(err)
	}
	stat := "/proc/" + strconv.Itoa(pid) + "/stat"
	if b, err := os.ReadFile(stat); err == nil {
		if ppid := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))[1]; ppid != strconv.Itoa(os.Getpid()) {
			t.Fatalf("the orphan's parent is %s, not the agent", ppid)
		}
	}
	for range 500 { // until it is gone; a zombie would stay (state Z) forever
		b, err := os.ReadFile(stat)
		if err != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
		_ = b
	}
	b, _ := os.ReadFile(stat)
	t.Fatalf("the orphan was not reaped: %s", b)
}

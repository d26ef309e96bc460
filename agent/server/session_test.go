package server

import (
	"context"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
)

// procStat returns state, pgrp and session of pid ("" once it is gone).
func procStat(pid int) (state string, pgrp, session int) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", 0, 0
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	pgrp, _ = strconv.Atoi(f[2])
	session, _ = strconv.Atoi(f[3])
	return f[0], pgrp, session
}

// An interactive shell on a terminal gives each background job a process
// group of its own, in the shell's session: when the Exec ends (the shell
// exits, or the caller cancels) every process of the session goes with it.
func TestPTYExecEndKillsTheWholeSession(t *testing.T) {
	a := newAgent(t)
	jobRe := regexp.MustCompile(`job=(\d+)`)
	for _, how := range []string{"cancel", "exit"} {
		ctx, cancel := context.WithCancel(authed(t))
		s, err := a.client.Exec(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_ = s.Send(execStart(&execv1.Command{Argv: []string{"sh", "-i"}}, &execv1.PtySize{Rows: 24, Cols: 80}))
		m, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		shell := int(m.GetStarted().Pid)
		_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("sleep 4321 &\necho job=$!\n")}})
		var out string
		job := 0
		for job == 0 {
			m, err := s.Recv()
			if err != nil {
				t.Fatalf("%s: %v after %q", how, err, out)
			}
			out += string(m.GetStdout())
			if g := jobRe.FindStringSubmatch(out); g != nil {
				job, _ = strconv.Atoi(g[1])
			}
		}
		t.Cleanup(func() { _ = unix.Kill(job, unix.SIGKILL) })
		if _, pgrp, sid := procStat(job); sid != shell || pgrp == shell {
			t.Fatalf("%s: the job (pgrp %d, session %d) is not in a group of its own in the shell's session %d", how, pgrp, sid, shell)
		}
		if how == "cancel" {
			cancel()
		} else {
			_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("exit\n")}})
		}
		for { // to the end of the call
			if _, err := s.Recv(); err != nil {
				break
			}
		}
		cancel()
		gone := false
		for range 250 {
			if st, _, _ := procStat(job); st == "" || st == "Z" {
				gone = true
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if !gone {
			t.Fatalf("%s: the shell's background job %d survived the Exec", how, job)
		}
	}
}

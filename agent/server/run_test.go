package server

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
)

func TestRunOutputExitCodeStdinEnvCwd(t *testing.T) {
	a := newAgent(t)
	ctx := authed(t)
	resp, err := a.client.Run(ctx, &execv1.RunRequest{ContainerId: testContainer,
		Command: &execv1.Command{Shell: `cat; echo "$BASE $EXTRA $(pwd)"; echo err >&2; exit 3`,
			Env: map[string]string{"EXTRA": "extra"}, Cwd: "/tmp"},
		Stdin: []byte("in\n")})
	if err != nil {
		t.Fatal(err)
	}
	if got := string(resp.Stdout); got != "in\nbase extra /tmp\n" {
		t.Fatalf("stdout %q", got)
	}
	if string(resp.Stderr) != "err\n" || resp.ExitStatus.ExitCode != 3 || resp.ExitStatus.TimedOut {
		t.Fatalf("resp %v", resp)
	}
	if resp.StartTime == nil || resp.Duration == nil {
		t.Fatal("no start_time or duration")
	}
}

func TestRunDefaultCwdIsWorkDirAndArgv(t *testing.T) {
	a := newAgent(t)
	if err := os.MkdirAll(a.cfg.WorkDir, 0o755); err != nil {
		t.Fatal(err)
	}
	resp, err := a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer,
		Command: &execv1.Command{Argv: []string{"pwd"}}})
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(resp.Stdout)) != a.cfg.WorkDir {
		t.Fatalf("cwd %q, want %q", resp.Stdout, a.cfg.WorkDir)
	}
}

func TestRunTimeoutKillsTheGroup(t *testing.T) {
	a := newAgent(t)
	marker := filepath.Join(t.TempDir(), "survived")
	resp, err := a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer,
		Command: sh(fmt.Sprintf("(sleep 1; touch %s) & sleep 30", marker)), Timeout: durationpb.New(300 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	st := resp.ExitStatus
	if !st.TimedOut || st.ExitCode != -1 || st.SignalNumber != 9 || st.Signal != execv1.Signal_SIGNAL_SIGKILL {
		t.Fatalf("status %v", st)
	}
	time.Sleep(1500 * time.Millisecond)
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("a process of the group survived the timeout")
	}
}

func TestRunTruncation(t *testing.T) {
	a := newAgent(t)
	resp, err := a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer,
		Command: sh("head -c 5000 /dev/zero; head -c 10 /dev/zero >&2"), MaxOutputBytes: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Stdout) != 1000 || !resp.StdoutTruncated || len(resp.Stderr) != 10 || resp.StderrTruncated {
		t.Fatalf("stdout %d %v stderr %d %v", len(resp.Stdout), resp.StdoutTruncated, len(resp.Stderr), resp.StderrTruncated)
	}
	// The default cap is 1 MiB; the maximum 2,064,384 is accepted, one more is not.
	resp, err = a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer,
		Command: sh("head -c 3000000 /dev/zero"), MaxOutputBytes: 2064384})
	if err != nil || len(resp.Stdout) != 2064384 || !resp.StdoutTruncated {
		t.Fatalf("%v %d", err, len(resp.GetStdout()))
	}
	_, err = a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer, Command: sh("true"), MaxOutputBytes: 2064385})
	wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "max_output_bytes"})
}

func TestRunKilledBySignal(t *testing.T) {
	a := newAgent(t)
	resp, err := a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer, Command: sh("kill -USR1 $$")})
	if err != nil {
		t.Fatal(err)
	}
	if st := resp.ExitStatus; st.ExitCode != -1 || st.Signal != execv1.Signal_SIGNAL_SIGUSR1 || st.SignalNumber != 10 || st.TimedOut {
		t.Fatalf("status %v", st)
	}
	resp, err = a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer, Command: sh("kill -PIPE $$")})
	if err != nil {
		t.Fatal(err)
	}
	if st := resp.ExitStatus; st.Signal != execv1.Signal_SIGNAL_UNSPECIFIED || st.SignalNumber != 13 {
		t.Fatalf("an unnamed signal: %v", st)
	}
}

func TestRunBadCommands(t *testing.T) {
	a := newAgent(t)
	ctx := authed(t)
	cases := []struct {
		cmd   *execv1.Command
		field string
	}{
		{&execv1.Command{Argv: []string{"true"}, Shell: "true"}, "command"},
		{&execv1.Command{}, "command.argv"},
		{&execv1.Command{Argv: []string{"no-such-program-here"}}, "command.argv"},
		{&execv1.Command{Argv: []string{"true"}, Env: map[string]string{"1BAD": "x"}}, "command.env"},
		{&execv1.Command{Argv: []string{"true"}, Cwd: "relative"}, "command.cwd"},
		{&execv1.Command{Argv: []string{"true"}, Cwd: "/no/such/dir"}, "command.cwd"},
		{&execv1.Command{Argv: []string{"true", strings.Repeat("x", 130<<10)}}, "command"},
	}
	for _, c := range cases {
		_, err := a.client.Run(ctx, &execv1.RunRequest{ContainerId: testContainer, Command: c.cmd})
		wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": c.field})
	}
	_, err := a.client.Run(ctx, &execv1.RunRequest{ContainerId: testContainer, Command: sh("true"), Timeout: durationpb.New(2 * time.Hour)})
	wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "timeout"})
}

// A process the command leaves behind holding its stdout does not hold the
// call: once the command exited and the pipe stayed empty, Run returns.
func TestRunReturnsWhileALeftoverHoldsThePipe(t *testing.T) {
	a := newAgent(t)
	resp, err := a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer,
		Command: sh("sleep 30 & echo started"), Timeout: durationpb.New(20 * time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Stdout) != "started\n" || resp.ExitStatus.ExitCode != 0 || resp.ExitStatus.TimedOut || resp.StdoutTruncated {
		t.Fatalf("resp %v", resp)
	}
}

// Many commands at once, each with its own exit code: the reaper hands every
// status to the command it belongs to.
func TestRunConcurrentExitCodes(t *testing.T) {
	a := newAgent(t)
	ctx := authed(t)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := a.client.Run(ctx, &execv1.RunRequest{ContainerId: testContainer, Command: sh(fmt.Sprintf("exit %d", i))})
			if err != nil {
				errs <- err
			} else if resp.ExitStatus.ExitCode != int32(i) {
				errs <- fmt.Errorf("exit %d reported as %d", i, resp.ExitStatus.ExitCode)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

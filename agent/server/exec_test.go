package server

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

type execResult struct {
	pid            int32
	stdout, stderr []byte
	exit           *execv1.ExitStatus
	err            error
	msgs           int
}

func execStart(cmd *execv1.Command, pty *execv1.PtySize) *execv1.ExecRequest {
	return &execv1.ExecRequest{Msg: &execv1.ExecRequest_Start{Start: &execv1.ExecStart{ContainerId: testContainer, Command: cmd, Pty: pty}}}
}

// collect reads the response stream to its end; pause between messages
// makes a slow reader; onStarted runs after `started`.
func collect(t *testing.T, s execv1.ExecService_ExecClient, pause time.Duration) execResult {
	t.Helper()
	var r execResult
	for {
		m, err := s.Recv()
		if err == io.EOF {
			return r
		}
		if err != nil {
			r.err = err
			return r
		}
		if r.exit != nil {
			t.Fatalf("a message after exit_status: %v", m)
		}
		r.msgs++
		switch v := m.Msg.(type) {
		case *execv1.ExecResponse_Started:
			r.pid = v.Started.Pid
		case *execv1.ExecResponse_Stdout:
			if len(v.Stdout) > chunkBytes {
				t.Fatalf("message of %d bytes", len(v.Stdout))
			}
			r.stdout = append(r.stdout, v.Stdout...)
		case *execv1.ExecResponse_Stderr:
			r.stderr = append(r.stderr, v.Stderr...)
		case *execv1.ExecResponse_ExitStatus:
			r.exit = v.ExitStatus
		}
		if pause > 0 {
			time.Sleep(pause)
		}
	}
}

func TestExecStdinCloseStdinAndHalfClose(t *testing.T) {
	a := newAgent(t)
	// close_stdin: cat sees EOF and exits; the stream's send side stays open.
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("cat; echo done >&2"), nil))
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("hello ")}})
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("world")}})
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_CloseStdin{CloseStdin: &execv1.CloseStdin{}}})
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_CloseStdin{CloseStdin: &execv1.CloseStdin{}}}) // ignored
	r := collect(t, s, 0)
	if r.err != nil || string(r.stdout) != "hello world" || string(r.stderr) != "done\n" || r.exit.ExitCode != 0 || r.pid <= 0 {
		t.Fatalf("%+v", r)
	}
	// Half-close closes stdin too.
	s, _ = a.client.Exec(authed(t))
	_ = s.Send(execStart(&execv1.Command{Argv: []string{"wc", "-c"}}, nil))
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: bytes.Repeat([]byte("x"), 3<<20)}})
	_ = s.CloseSend()
	r = collect(t, s, 0)
	if r.err != nil || strings.TrimSpace(string(r.stdout)) != strconv.Itoa(3<<20) {
		t.Fatalf("%+v", r)
	}
	// stdin after close_stdin is a stream error.
	s, _ = a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("sleep 30"), nil))
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_CloseStdin{CloseStdin: &execv1.CloseStdin{}}})
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("late")}})
	r = collect(t, s, 0)
	wantErr(t, r.err, codes.InvalidArgument, "INVALID_STREAM", nil)
	// The command closing its stdin itself: later stdin is dropped, no error.
	s, _ = a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("exec 0<&-; sleep 0.3; echo ok"), nil))
	time.Sleep(100 * time.Millisecond)
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("dropped")}})
	_ = s.CloseSend()
	r = collect(t, s, 0)
	if r.err != nil || string(r.stdout) != "ok\n" {
		t.Fatalf("%+v", r)
	}
}

func TestExecFirstMessageMustBeStart(t *testing.T) {
	a := newAgent(t)
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("x")}})
	wantErr(t, collect(t, s, 0).err, codes.InvalidArgument, "INVALID_STREAM", nil)
	s, _ = a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("true"), &execv1.PtySize{Rows: 0, Cols: 80}))
	wantErr(t, collect(t, s, 0).err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "start.pty"})
	s, _ = a.client.Exec(authed(t))
	_ = s.Send(execStart(&execv1.Command{Argv: []string{"/no/such"}}, nil))
	wantErr(t, collect(t, s, 0).err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "start.command.argv"})
}

func TestExecSignalGoesToTheGroup(t *testing.T) {
	a := newAgent(t)
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.05; done"), nil))
	m, _ := s.Recv() // started
	if m.GetStarted() == nil {
		t.Fatalf("first message %v", m)
	}
	m, _ = s.Recv()
	if string(m.GetStdout()) != "ready\n" {
		t.Fatalf("got %v", m)
	}
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Signal{Signal: execv1.Signal_SIGNAL_SIGINT}})
	r := collect(t, s, 0)
	if r.err != nil || string(r.stdout) != "got-int\n" || r.exit.ExitCode != 7 {
		t.Fatalf("%+v", r)
	}
	// UNSPECIFIED means SIGTERM.
	s, _ = a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("sleep 30"), nil))
	_, _ = s.Recv()
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Signal{}})
	r = collect(t, s, 0)
	if r.err != nil || r.exit.Signal != execv1.Signal_SIGNAL_SIGTERM || r.exit.ExitCode != -1 {
		t.Fatalf("%+v", r)
	}
}

// The old implementation lost the tail of this with a slow reader: every
// byte of `seq 1 4000000` arrives, then the exit status.
func TestExecSlowReaderGetsAllOutput(t *testing.T) {
	a := newAgent(t)
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(execStart(&execv1.Command{Argv: []string{"seq", "1", "4000000"}}, nil))
	_ = s.CloseSend()
	r := collect(t, s, 10*time.Millisecond)
	want := 0
	for i := 1; i <= 4000000; i++ {
		want += len(strconv.Itoa(i)) + 1
	}
	if r.err != nil || r.exit == nil || r.exit.ExitCode != 0 {
		t.Fatalf("err %v exit %v", r.err, r.exit)
	}
	if len(r.stdout) != want || !bytes.HasSuffix(r.stdout, []byte("\n3999999\n4000000\n")) {
		t.Fatalf("got %d bytes, want %d", len(r.stdout), want)
	}
}

// Many small writes go out as few messages.
func TestExecBatchesSmallWrites(t *testing.T) {
	a := newAgent(t)
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("i=0; while [ $i -lt 2000 ]; do echo $i; i=$((i+1)); done"), nil))
	_ = s.CloseSend()
	r := collect(t, s, 0)
	if r.err != nil || len(r.stdout) < 2000 || r.msgs > 1000 {
		t.Fatalf("%d bytes in %d messages (%v)", len(r.stdout), r.msgs, r.err)
	}
}

// Cancelling the call kills the command's whole process group.
func TestExecCancelKillsTheGroup(t *testing.T) {
	a := newAgent(t)
	marker := filepath.Join(t.TempDir(), "survived")
	ctx, cancel := context.WithCancel(authed(t))
	s, _ := a.client.Exec(ctx)
	_ = s.Send(execStart(sh(fmt.Sprintf("(sleep 1; touch %s) & echo up; sleep 30", marker)), nil))
	_, _ = s.Recv()
	_, _ = s.Recv() // "up"
	cancel()
	if _, err := s.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("got %v", err)
	}
	time.Sleep(1500 * time.Millisecond)
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the command's group survived the cancel")
	}
}

// A leftover process that left the command's group (so it outlives it) and
// keeps writing after the command exited: the stream says output was cut,
// after the exit status.
func TestExecOutputCutIsAnError(t *testing.T) {
	a := newAgent(t, func(c *Config) { c.DrainMax = 500 * time.Millisecond })
	s, _ := a.client.Exec(authed(t))
	// The command waits until the writer has left its group (else the
	// group kill at its exit may catch the writer before its setsid).
	ready := filepath.Join(t.TempDir(), "ready")
	_ = s.Send(execStart(sh(fmt.Sprintf("setsid sh -c \"touch %[1]s; trap '' PIPE; while :; do echo more || exit; sleep 0.01; done\" & "+
		"while [ ! -e %[1]s ]; do sleep 0.01; done; echo first", ready)), nil))
	_ = s.CloseSend()
	r := collect(t, s, 0)
	if r.exit == nil || r.exit.ExitCode != 0 {
		t.Fatalf("no exit status before the error: %+v", r)
	}
	wantErr(t, r.err, codes.DeadlineExceeded, "TIMEOUT", nil)
}

func TestExecPTYSizeAndResize(t *testing.T) {
	if _, err := os.Stat("/dev/ptmx"); err != nil {
		t.Fatal("this test needs /dev/ptmx")
	}
	a := newAgent(t)
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(execStart(sh(`stty size; trap 'stty size; exit 0' WINCH; echo armed; while :; do sleep 0.05; done`),
		&execv1.PtySize{Rows: 24, Cols: 80}))
	var out []byte
	for !bytes.Contains(out, []byte("armed")) {
		m, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if m.GetStderr() != nil {
			t.Fatal("stderr with a PTY")
		}
		out = append(out, m.GetStdout()...)
	}
	if !bytes.Contains(out, []byte("24 80")) {
		t.Fatalf("initial size: %q", out)
	}
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Resize{Resize: &execv1.PtySize{Rows: 50, Cols: 132}}})
	r := collect(t, s, 0)
	if r.err != nil || !bytes.Contains(r.stdout, []byte("50 132")) || r.exit.ExitCode != 0 {
		t.Fatalf("%q %+v", r.stdout, r)
	}
	// A terminal's stdin: a line and then EOF (close_stdin sends VEOF).
	s, _ = a.client.Exec(authed(t))
	_ = s.Send(execStart(&execv1.Command{Argv: []string{"cat"}}, &execv1.PtySize{Rows: 24, Cols: 80}))
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Stdin{Stdin: []byte("typed\n")}})
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_CloseStdin{CloseStdin: &execv1.CloseStdin{}}})
	r = collect(t, s, 0)
	if r.err != nil || bytes.Count(r.stdout, []byte("typed")) != 2 || r.exit.ExitCode != 0 {
		t.Fatalf("%q %+v", r.stdout, r)
	}
	// resize without a PTY is refused.
	s, _ = a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("sleep 30"), nil))
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Resize{Resize: &execv1.PtySize{Rows: 5, Cols: 5}}})
	wantErr(t, collect(t, s, 0).err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "resize"})
}

func TestExecKeepalive(t *testing.T) {
	a := newAgent(t, func(c *Config) { c.Keepalive = 100 * time.Millisecond })
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(execStart(sh("sleep 0.5"), nil))
	_ = s.CloseSend()
	kept := 0
	for {
		m, err := s.Recv()
		if err != nil {
			break
		}
		if m.GetKeepalive() != nil {
			kept++
		}
	}
	if kept == 0 {
		t.Fatal("no keepalive on an idle stream")
	}
}

func TestExecTimeout(t *testing.T) {
	a := newAgent(t)
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Start{Start: &execv1.ExecStart{ContainerId: testContainer,
		Command: sh("echo before; sleep 30"), Timeout: durationpb.New(200 * time.Millisecond)}}})
	_ = s.CloseSend()
	r := collect(t, s, 0)
	if r.err != nil || !r.exit.TimedOut || r.exit.Signal != execv1.Signal_SIGNAL_SIGKILL || string(r.stdout) != "before\n" {
		t.Fatalf("%+v", r)
	}
}

// Run and Exec end with their command: what it left running in its process
// group is killed, and what it wrote before is still delivered.
func TestLeftoversInTheGroupEndWithTheCommand(t *testing.T) {
	a := newAgent(t)
	marker := filepath.Join(t.TempDir(), "survived")
	script := fmt.Sprintf("(sleep 1; touch %s) & echo hi", marker)
	resp, err := a.client.Run(authed(t), &execv1.RunRequest{ContainerId: testContainer, Command: sh(script)})
	if err != nil || string(resp.Stdout) != "hi\n" {
		t.Fatalf("%v %v", resp, err)
	}
	s, _ := a.client.Exec(authed(t))
	_ = s.Send(execStart(sh(script+"; exit 3"), nil))
	_ = s.CloseSend()
	if r := collect(t, s, 0); r.exit == nil || r.exit.ExitCode != 3 || r.err != nil {
		t.Fatalf("%+v", r)
	}
	time.Sleep(1500 * time.Millisecond)
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("a process the command left in its group survived it")
	}
}

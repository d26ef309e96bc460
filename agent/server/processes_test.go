package server

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

func startProc(t *testing.T, a *agent, id string, cmd *execv1.Command) *execv1.StartProcessResponse {
	t.Helper()
	resp, err := a.client.StartProcess(authed(t), &execv1.StartProcessRequest{ContainerId: testContainer, ProcessId: id, Command: cmd})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func waitExited(t *testing.T, a *agent, id string) *execv1.Process {
	t.Helper()
	for range 1000 {
		resp, err := a.client.GetProcess(authed(t), &execv1.GetProcessRequest{ContainerId: testContainer, ProcessId: id})
		if err != nil {
			t.Fatal(err)
		}
		if resp.Process.State == execv1.ProcessState_PROCESS_STATE_EXITED {
			return resp.Process
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s did not exit", id)
	return nil
}

type attached struct {
	out, err   []byte
	outChunks  []*execv1.OutputChunk
	exit       *execv1.ExitStatus
	keepalives int
	rpcErr     error
}

func attach(t *testing.T, a *agent, req *execv1.AttachProcessRequest) attached {
	t.Helper()
	req.ContainerId = testContainer
	s, err := a.client.AttachProcess(authed(t), req)
	if err != nil {
		t.Fatal(err)
	}
	var r attached
	for {
		m, err := s.Recv()
		if err == io.EOF {
			return r
		}
		if err != nil {
			r.rpcErr = err
			return r
		}
		if r.exit != nil {
			t.Fatal("a message after exit_status")
		}
		switch v := m.Msg.(type) {
		case *execv1.AttachProcessResponse_Stdout:
			r.out = append(r.out, v.Stdout.Data...)
			r.outChunks = append(r.outChunks, v.Stdout)
		case *execv1.AttachProcessResponse_Stderr:
			r.err = append(r.err, v.Stderr.Data...)
		case *execv1.AttachProcessResponse_ExitStatus:
			r.exit = v.ExitStatus
		case *execv1.AttachProcessResponse_Keepalive:
			r.keepalives++
		}
	}
}

func TestProcessLifecycle(t *testing.T) {
	a := newAgent(t)
	cmd := sh("echo out; echo err >&2; exit 4")
	first := startProc(t, a, "job-1", cmd)
	if !first.Created || first.Process.Command.Shell != cmd.Shell || len(first.Process.Command.Argv) != 0 || first.Process.Pid <= 0 {
		t.Fatalf("%v", first)
	}
	again := startProc(t, a, "job-1", sh("echo other")) // idempotent, whatever the command
	if again.Created || again.Process.Pid != first.Process.Pid {
		t.Fatalf("%v", again)
	}
	p := waitExited(t, a, "job-1")
	if p.ExitStatus.ExitCode != 4 || p.StdoutBytes != 4 || p.StderrBytes != 4 || p.EndTime == nil || p.StdoutFirstOffset != 0 {
		t.Fatalf("%v", p)
	}
	r := attach(t, a, &execv1.AttachProcessRequest{ProcessId: "job-1"})
	if string(r.out) != "out\n" || string(r.err) != "err\n" || r.exit.GetExitCode() != 4 {
		t.Fatalf("%+v", r)
	}
	r = attach(t, a, &execv1.AttachProcessRequest{ProcessId: "job-1", StdoutOffset: 2, StderrOffset: 4})
	if string(r.out) != "t\n" || len(r.err) != 0 || r.outChunks[0].Offset != 2 || r.outChunks[0].DroppedBefore {
		t.Fatalf("%+v", r)
	}
	_, err := a.client.GetProcess(authed(t), &execv1.GetProcessRequest{ContainerId: testContainer, ProcessId: "nope"})
	wantErr(t, err, codes.NotFound, "PROCESS_NOT_FOUND", map[string]string{"process_id": "nope", "container_id": testContainer})
	for _, bad := range []string{"", "-x", "Upper", "a_b", string(bytes.Repeat([]byte("a"), 64))} {
		_, err = a.client.StartProcess(authed(t), &execv1.StartProcessRequest{ContainerId: testContainer, ProcessId: bad, Command: cmd})
		wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "process_id"})
	}
	// Signalling an exited process succeeds and changes nothing.
	sig, err := a.client.SignalProcess(authed(t), &execv1.SignalProcessRequest{ContainerId: testContainer, ProcessId: "job-1"})
	if err != nil || sig.Process.ExitStatus.ExitCode != 4 {
		t.Fatalf("%v %v", err, sig)
	}
	_, err = a.client.AttachProcess(authed(t), &execv1.AttachProcessRequest{ContainerId: testContainer, ProcessId: "job-1", StdoutOffset: -1})
	if err == nil {
		s, _ := a.client.AttachProcess(authed(t), &execv1.AttachProcessRequest{ContainerId: testContainer, ProcessId: "job-1", StdoutOffset: -1})
		_, err = s.Recv()
	}
	wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "stdout_offset"})
}

func TestProcessRingDropsOldestAndFollow(t *testing.T) {
	a := newAgent(t, func(c *Config) { c.RingBytes = 1000; c.Keepalive = 50 * time.Millisecond })
	// 3,000 bytes through a 1,000-byte ring, then a pause, then a last line.
	startProc(t, a, "ring", sh(`i=0; while [ $i -lt 300 ]; do echo 123456789; i=$((i+1)); done; sleep 0.3; echo last`))
	r := attach(t, a, &execv1.AttachProcessRequest{ProcessId: "ring", Follow: true})
	if r.rpcErr != nil || r.exit == nil || r.exit.ExitCode != 0 {
		t.Fatalf("%+v", r)
	}
	if !bytes.HasSuffix(r.out, []byte("123456789\nlast\n")) {
		t.Fatalf("tail %q", r.out[max(0, len(r.out)-40):])
	}
	if r.keepalives == 0 {
		t.Fatal("no keepalive while following an idle process")
	}
	p := waitExited(t, a, "ring")
	if p.StdoutBytes != 3005 || p.StdoutFirstOffset != 2005 {
		t.Fatalf("%v", p)
	}
	r = attach(t, a, &execv1.AttachProcessRequest{ProcessId: "ring", StdoutOffset: 10})
	c := r.outChunks[0]
	if !c.DroppedBefore || c.Offset != 2005 || len(r.out) != 1000 {
		t.Fatalf("first chunk offset %d dropped %v, %d bytes", c.Offset, c.DroppedBefore, len(r.out))
	}
	// Without follow on a running process: what is buffered, then the end.
	startProc(t, a, "sleeper", sh("echo hi; sleep 30"))
	for {
		r = attach(t, a, &execv1.AttachProcessRequest{ProcessId: "sleeper"})
		if len(r.out) > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if string(r.out) != "hi\n" || r.exit != nil {
		t.Fatalf("%+v", r)
	}
	resp, err := a.client.SignalProcess(authed(t), &execv1.SignalProcessRequest{ContainerId: testContainer, ProcessId: "sleeper",
		Signal: execv1.Signal_SIGNAL_SIGKILL})
	if err != nil || resp.Process.ProcessId != "sleeper" {
		t.Fatal(err)
	}
	if p := waitExited(t, a, "sleeper"); p.ExitStatus.Signal != execv1.Signal_SIGNAL_SIGKILL {
		t.Fatalf("%v", p)
	}
}

func TestListProcessesPagingAndQuota(t *testing.T) {
	a := newAgent(t, func(c *Config) { c.MaxProcesses = 5 })
	for i := range 5 {
		startProc(t, a, fmt.Sprintf("p%d", i), sh("sleep 30"))
	}
	_, err := a.client.StartProcess(authed(t), &execv1.StartProcessRequest{ContainerId: testContainer, ProcessId: "p5", Command: sh("true")})
	wantErr(t, err, codes.ResourceExhausted, "QUOTA_EXCEEDED", map[string]string{"limit": "5"})

	var ids []string
	token := ""
	for {
		resp, err := a.client.ListProcesses(authed(t), &execv1.ListProcessesRequest{ContainerId: testContainer, PageSize: 2, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range resp.Processes {
			ids = append(ids, p.ProcessId)
		}
		if token = resp.NextPageToken; token == "" {
			break
		}
	}
	if fmt.Sprint(ids) != "[p0 p1 p2 p3 p4]" {
		t.Fatalf("oldest first: %v", ids)
	}
	// A finished process makes room: the oldest finished one is evicted.
	_, _ = a.client.SignalProcess(authed(t), &execv1.SignalProcessRequest{ContainerId: testContainer, ProcessId: "p1", Signal: execv1.Signal_SIGNAL_SIGKILL})
	waitExited(t, a, "p1")
	resp, err := a.client.ListProcesses(authed(t), &execv1.ListProcessesRequest{ContainerId: testContainer,
		State: execv1.ProcessState_PROCESS_STATE_EXITED})
	if err != nil || len(resp.Processes) != 1 || resp.Processes[0].ProcessId != "p1" {
		t.Fatalf("%v %v", err, resp)
	}
	startProc(t, a, "p5", sh("true"))
	_, err = a.client.GetProcess(authed(t), &execv1.GetProcessRequest{ContainerId: testContainer, ProcessId: "p1"})
	wantErr(t, err, codes.NotFound, "PROCESS_NOT_FOUND", nil)

	running := &execv1.ListProcessesRequest{ContainerId: testContainer, State: execv1.ProcessState_PROCESS_STATE_RUNNING, PageSize: 1}
	page, err := a.client.ListProcesses(authed(t), running)
	if err != nil || page.NextPageToken == "" {
		t.Fatal(err)
	}
	// A token of another listing (other state), or garbage, is refused.
	for _, tok := range []string{"garbage!", page.NextPageToken + "x", page.NextPageToken} {
		_, err = a.client.ListProcesses(authed(t), &execv1.ListProcessesRequest{ContainerId: testContainer, PageToken: tok})
		wantErr(t, err, codes.InvalidArgument, "INVALID_PAGE_TOKEN", map[string]string{"field": "page_token"})
	}
	_, err = a.client.ListProcesses(authed(t), &execv1.ListProcessesRequest{ContainerId: testContainer, PageSize: -1})
	wantErr(t, err, codes.InvalidArgument, "INVALID_FIELD", map[string]string{"field": "page_size"})
	for _, id := range []string{"p0", "p2", "p3", "p4"} {
		_, _ = a.client.SignalProcess(authed(t), &execv1.SignalProcessRequest{ContainerId: testContainer, ProcessId: id, Signal: execv1.Signal_SIGNAL_SIGKILL})
	}
}

// Pages stay under the caller's 4 MiB receive limit however big the
// commands are: 40 processes with 120 KB of environment each (4.8 MB) come
// in several pages, every one of them received with the default limit.
func TestListProcessesPagesStayUnderTheMessageLimit(t *testing.T) {
	a := newAgent(t)
	big := strings.Repeat("x", 120_000)
	for i := range 40 {
		startProc(t, a, fmt.Sprintf("big-%02d", i), &execv1.Command{Argv: []string{"sleep", "600"}, Env: map[string]string{"BIG": big}})
	}
	t.Cleanup(func() {
		for i := range 40 {
			_, _ = a.client.SignalProcess(authed(t), &execv1.SignalProcessRequest{ContainerId: testContainer,
				ProcessId: fmt.Sprintf("big-%02d", i), Signal: execv1.Signal_SIGNAL_SIGKILL})
		}
	})
	var seen []string
	token, pages := "", 0
	for {
		resp, err := a.client.ListProcesses(authed(t), &execv1.ListProcessesRequest{ContainerId: testContainer,
			PageSize: 1000, PageToken: token}, grpc.MaxCallRecvMsgSize(4<<20))
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		pages++
		for _, p := range resp.Processes {
			seen = append(seen, p.ProcessId)
		}
		if token = resp.NextPageToken; token == "" {
			break
		}
	}
	if len(seen) != 40 || pages < 2 || seen[0] != "big-00" || seen[39] != "big-39" {
		t.Fatalf("%d pages, %d processes: %v", pages, len(seen), seen)
	}
}

// Output a ring could not store (the container's disk was full) is not lost
// silently: the offsets count it, and an attach skips it with
// dropped_before. ROOT-ONLY: the state dir is a small tmpfs the test fills.
func TestRingWriteFailuresShowAsDropped(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("ROOT-ONLY: mounts a tmpfs; runs in CI as root")
	}
	state, marks := t.TempDir(), t.TempDir()
	if err := unix.Mount("tmpfs", state, "tmpfs", 0, "size=256k"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(state, unix.MNT_DETACH) })
	a := newAgent(t, func(c *Config) { c.StateDir = state })
	script := fmt.Sprintf(`printf first; while [ ! -e %[1]s/full ]; do sleep 0.01; done
head -c 20000 /dev/zero; while [ ! -e %[1]s/freed ]; do sleep 0.01; done; printf after`, marks)
	startProc(t, a, "full", sh(script))
	for i := 0; ; i++ { // "first" is in its ring
		resp, _ := a.client.GetProcess(authed(t), &execv1.GetProcessRequest{ContainerId: testContainer, ProcessId: "full"})
		if resp != nil && resp.Process.StdoutBytes == 5 {
			break
		}
		if i > 500 {
			t.Fatal("no output")
		}
		time.Sleep(10 * time.Millisecond)
	}
	filler, err := os.Create(filepath.Join(state, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	for _, err = filler.Write(make([]byte, 4096)); err == nil; _, err = filler.Write(make([]byte, 4096)) {
	}
	_ = os.WriteFile(filepath.Join(marks, "full"), nil, 0o644)
	for i := 0; ; i++ { // the 20000 bytes were taken from the pipe
		resp, _ := a.client.GetProcess(authed(t), &execv1.GetProcessRequest{ContainerId: testContainer, ProcessId: "full"})
		if resp != nil && resp.Process.StdoutBytes == 20005 {
			break
		}
		if i > 500 {
			t.Fatalf("stdout_bytes stuck: %v", resp.GetProcess())
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = filler.Close()
	_ = os.Remove(filler.Name())
	_ = os.WriteFile(filepath.Join(marks, "freed"), nil, 0o644)
	p := waitExited(t, a, "full")
	if p.StdoutBytes != 20010 {
		t.Fatalf("stdout_bytes %d", p.StdoutBytes)
	}
	r := attach(t, a, &execv1.AttachProcessRequest{ProcessId: "full"})
	first, last := r.outChunks[0], r.outChunks[len(r.outChunks)-1]
	if first.Offset != 0 || !bytes.HasPrefix(first.Data, []byte("first")) || first.DroppedBefore {
		t.Fatalf("first chunk %d %q %v", first.Offset, first.Data[:min(len(first.Data), 8)], first.DroppedBefore)
	}
	if last.Offset != 20005 || string(last.Data) != "after" || !last.DroppedBefore || len(r.out) >= 20010 {
		t.Fatalf("last chunk %d %q dropped %v; %d bytes received", last.Offset, last.Data, last.DroppedBefore, len(r.out))
	}
}

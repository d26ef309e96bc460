package main

import (
	"bytes"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

// The local backend's way: the parent binds and listens, hands the socket
// over as fd 3, the token through a pipe (fd 4) and waits for "R" on fd 5.
func TestBinaryInheritsListenerTokenAndReadyFDs(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	lf, err := lis.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	lis.(*net.UnixListener).SetUnlinkOnClose(false)
	_ = lis.Close() // the child's copy keeps the socket listening
	tokR, tokW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary(t), "--listen", "fd:3", "--token-fd", "4", "--ready-fd", "5",
		"--container-id", "c-bin", "--workdir", dir, "--state-dir", filepath.Join(dir, "state"))
	cmd.Env, cmd.Stderr = []string{"PATH=/usr/bin:/bin"}, os.Stderr
	cmd.ExtraFiles = []*os.File{lf, tokR, readyW}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for _, f := range []*os.File{lf, tokR, readyW} {
		_ = f.Close()
	}
	if _, err := tokW.WriteString(token + "\n"); err != nil {
		t.Fatal(err)
	}
	_ = tokW.Close()
	got, err := io.ReadAll(readyR) // "R", then EOF: the agent closed its end
	if err != nil || string(got) != "R" {
		t.Fatalf("ready fd: %q %v", got, err)
	}
	conn, err := grpc.NewClient("unix:"+sock, dialOpts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := &running{cmd: cmd, client: execv1.NewExecServiceClient(conn)}
	// The commands inherit none of the three fds (3 is ls's own directory;
	// whatever the test runner itself inherited without CLOEXEC may show too).
	out := runSh(t, r, "ls -l /proc/self/fd")
	if strings.Contains(out, " 4 -> ") || strings.Contains(out, " 5 -> ") || strings.Contains(out, "socket:") {
		t.Fatalf("a command inherited the agent's fds: %q", out)
	}
}

func TestBinaryRefusesAShortTokenFromAnFD(t *testing.T) {
	tokR, tokW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	_, _ = tokW.WriteString("short")
	_ = tokW.Close()
	cmd := exec.Command(binary(t), "--listen", "unix:"+filepath.Join(t.TempDir(), "s"), "--token-fd", "3", "--container-id", "c")
	cmd.ExtraFiles = []*os.File{tokR}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil || !strings.Contains(stderr.String(), "16-1024") {
		t.Fatalf("want a refusal, got %v %q", err, stderr.String())
	}
}

// `sandhub-agent install DEST`: a copy of itself, mode 0555, put in place by
// rename (an image with no cp delivers the agent this way).
func TestInstallCopiesItself(t *testing.T) {
	bin := binary(t)
	dest := filepath.Join(t.TempDir(), "sandhub-agent")
	if err := os.WriteFile(dest, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "install", dest).CombinedOutput(); err != nil {
		t.Fatalf("install: %v %s", err, out)
	}
	want, _ := os.ReadFile(bin)
	got, _ := os.ReadFile(dest)
	if !bytes.Equal(want, got) {
		t.Fatal("the copy differs from the binary")
	}
	st, err := os.Stat(dest)
	if err != nil || st.Mode().Perm() != 0o555 {
		t.Fatalf("mode: %v %v", st.Mode(), err)
	}
	entries, _ := os.ReadDir(filepath.Dir(dest))
	if len(entries) != 1 {
		t.Fatalf("left behind: %v", entries)
	}
	if out, err := exec.Command(dest, "install", filepath.Join(t.TempDir(), "no", "such", "dir")).CombinedOutput(); err == nil {
		t.Fatalf("install into a missing directory succeeded: %s", out)
	}
}

// memfd is a memfd holding data, its offset at the end (as a parent leaves it).
func memfd(t *testing.T, data string) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "memfd")
	if _, err := f.WriteString(data); err != nil {
		t.Fatal(err)
	}
	return f
}

// The local backend hands the token and the container's environment over in
// memfds (NUL-separated: a value may hold a newline), and the open-files
// limit applies to every command.
func TestBinaryTakesTokenAndEnvFromMemfdsAndLimitsOpenFiles(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	cmd := exec.Command(binary(t), "--listen", "unix:"+sock, "--token-fd", "3", "--env-fd", "4", "--open-files", "77",
		"--container-id", "c-bin", "--workdir", dir, "--state-dir", filepath.Join(dir, "state"))
	cmd.Env, cmd.Stderr = []string{"SANDHUB_CONTAINER_ID=c-bin", "AGENT_ONLY=1"}, os.Stderr
	cmd.ExtraFiles = []*os.File{memfd(t, token), memfd(t, "PATH=/usr/bin:/bin\x00MULTI=a\nb\x00SANDHUB_MINE=kept\x00")}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for range 500 {
		if c, err := net.Dial("unix", sock); err == nil {
			_ = c.Close()
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix:"+sock, dialOpts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := &running{cmd: cmd, client: execv1.NewExecServiceClient(conn)}
	out := runSh(t, r, `printf '%s|' "$MULTI" "$SANDHUB_MINE" "$AGENT_ONLY"; ulimit -n; ulimit -Hn`)
	if out != "a\nb|kept||77\n77\n" {
		t.Fatalf("got %q", out)
	}
}

// `install --chown UID:GID DEST DIR...` also makes each DIR and hands it over.
func TestInstallPreparesDirectoriesForAnotherUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("ROOT-ONLY: chown to another uid needs root; runs in CI as root")
	}
	root := t.TempDir()
	dest, work, state := filepath.Join(root, "agent"), filepath.Join(root, "work"), filepath.Join(root, "run", "sandhub")
	if out, err := exec.Command(binary(t), "install", "--chown", "1234:2345", dest, work, state).CombinedOutput(); err != nil {
		t.Fatalf("install: %v %s", err, out)
	}
	for _, d := range []string{work, state} {
		var st unix.Stat_t
		if err := unix.Stat(d, &st); err != nil || st.Uid != 1234 || st.Gid != 2345 || st.Mode&unix.S_IFDIR == 0 {
			t.Fatalf("%s: %+v %v", d, st, err)
		}
	}
	for _, bad := range [][]string{{"install", dest, work}, {"install", "--chown", "x:1", dest, work}, {"install"}} {
		if out, err := exec.Command(binary(t), bad...).CombinedOutput(); err == nil {
			t.Fatalf("%v succeeded: %s", bad, out)
		}
	}
}

// The agent's stderr is a pipe nobody reads any more (the local backend's
// start-up pipe once the Orchestrator moved on) and gRPC logs to it: the
// agent (pid 1) must live on. Commands see only their own fds 0-2, whatever
// the agent inherited, and get SIGPIPE as usual.
func TestBinarySurvivesABrokenStderrAndLeaksNoFDs(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	errR, errW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	_ = errR.Close() // writes to fd 2 now fail with EPIPE
	leakR, leakW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer leakR.Close()
	cmd := exec.Command(binary(t), "--listen", "unix:"+sock, "--container-id", "c-bin",
		"--workdir", dir, "--state-dir", filepath.Join(dir, "state"))
	// gRPC logs every connection at this level, to fd 2.
	cmd.Env = []string{"PATH=/usr/bin:/bin", "SANDHUB_AGENT_TOKEN=" + token,
		"GRPC_GO_LOG_SEVERITY_LEVEL=info", "GRPC_GO_LOG_VERBOSITY_LEVEL=99"}
	cmd.Stderr, cmd.Stdout = errW, errW
	cmd.ExtraFiles = []*os.File{leakW} // fd 3, not the agent's business
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
	_ = errW.Close()
	_ = leakW.Close()
	for range 500 {
		if c, err := net.Dial("unix", sock); err == nil {
			_ = c.Close()
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	for i := range 5 { // new connections: more log lines
		conn, err := grpc.NewClient("unix:"+sock, dialOpts...)
		if err != nil {
			t.Fatal(err)
		}
		r := &running{cmd: cmd, client: execv1.NewExecServiceClient(conn)}
		_, err = r.client.Run(ctx(t), &execv1.RunRequest{ContainerId: "c-bin", Command: &execv1.Command{Shell: "true"}})
		_ = conn.Close()
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	time.Sleep(200 * time.Millisecond) // the closing connections' log lines
	select {
	case err := <-exited:
		t.Fatalf("the agent died: %v", err)
	default:
	}
	conn, err := grpc.NewClient("unix:"+sock, dialOpts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := &running{cmd: cmd, client: execv1.NewExecServiceClient(conn)}
	// 3 is ls's own directory: nothing else.
	if out := runSh(t, r, "ls /proc/self/fd"); out != "0\n1\n2\n3\n" {
		t.Fatalf("a command's fds: %q", out)
	}
	if out := runSh(t, r, `exec 3>&1; { yes; echo "st=$?" >&3; } | head -c1 >/dev/null`); out != "st=141\n" {
		t.Fatalf("SIGPIPE in a command: %q", out)
	}
}

// `install --token-env VAR --token-file PATH`: the init container's variable
// becomes a 0600 file (owned by --chown's user) the agent later reads and
// removes; an empty or short variable is refused.
func TestInstallWritesTheTokenFile(t *testing.T) {
	root := t.TempDir()
	dest, tf := filepath.Join(root, "agent"), filepath.Join(root, "run", "sandhub", "agent-token")
	args := []string{"install", "--token-env", "TOK", "--token-file", tf, dest}
	if os.Getuid() == 0 {
		args = append([]string{"install", "--chown", "1234:2345"}, args[1:]...)
	}
	cmd := exec.Command(binary(t), args...)
	cmd.Env = []string{"TOK=" + token}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("install: %v %s", err, out)
	}
	var st unix.Stat_t
	if err := unix.Stat(tf, &st); err != nil || st.Mode&0o777 != 0o600 {
		t.Fatalf("token file: %+v %v", st, err)
	}
	if os.Getuid() == 0 && (st.Uid != 1234 || st.Gid != 2345) {
		t.Fatalf("token file owner %d:%d", st.Uid, st.Gid)
	}
	if b, _ := os.ReadFile(tf); string(b) != token {
		t.Fatalf("token file holds %q", b)
	}
	entries, _ := os.ReadDir(filepath.Dir(tf))
	if len(entries) != 1 {
		t.Fatalf("left behind: %v", entries)
	}
	for _, env := range [][]string{{}, {"TOK=short"}} {
		cmd := exec.Command(binary(t), "install", "--token-env", "TOK", "--token-file", tf+"2", dest)
		cmd.Env = env
		if out, err := cmd.CombinedOutput(); err == nil {
			t.Fatalf("%v: install succeeded: %s", env, out)
		}
	}
	if out, err := exec.Command(binary(t), "install", "--token-env", "TOK", dest).CombinedOutput(); err == nil {
		t.Fatalf("--token-env without --token-file succeeded: %s", out)
	}
}

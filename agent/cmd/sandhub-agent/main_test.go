package main

// These tests build the real binary and run it as a separate process (the
// way every backend runs it), so the test process itself has no reaper.

import (
	"context"
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sandhub/sandhub/agent/server"
	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

const token = "binary-test-token-0123456789"

var (
	buildOnce sync.Once
	built     string
	buildErr  string
)

// binary is $SANDHUB_AGENT when make built it, else built once here the
// same way (CGO_ENABLED=0, -trimpath, -s -w).
func binary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("SANDHUB_AGENT"); p != "" {
		return p
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sandhub-agent-test")
		if err != nil {
			buildErr = err.Error()
			return
		}
		built = filepath.Join(dir, "sandhub-agent")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", built, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Sprintf("build: %v\n%s", err, b)
		}
	})
	if buildErr != "" {
		t.Fatal(buildErr)
	}
	return built
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built != "" {
		_ = os.RemoveAll(filepath.Dir(built))
	}
	os.Exit(code)
}

func TestBinaryIsStatic(t *testing.T) {
	f, err := elf.Open(binary(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatal("the binary has a PT_INTERP: it needs a dynamic loader the image may lack")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Fatalf("linked against %v", libs)
	}
}

type running struct {
	cmd    *exec.Cmd
	client execv1.ExecServiceClient
}

// startAgent runs the binary with the token in its environment (and sysAttr
// for a pid namespace when given).
func startAgent(t *testing.T, sys *syscall.SysProcAttr, tokenFile bool, extra ...string) *running {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	args := []string{"--listen", "unix:" + sock, "--container-id", "c-bin", "--workdir", dir, "--state-dir", filepath.Join(dir, "state")}
	env := []string{"PATH=/usr/bin:/bin", "VISIBLE=yes", "SANDHUB_CONTAINER_ID=ignored-by-flag"}
	if tokenFile {
		tf := filepath.Join(dir, "token")
		if err := os.WriteFile(tf, []byte(token+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--token-file", tf)
	} else {
		env = append(env, "SANDHUB_AGENT_TOKEN="+token)
	}
	cmd := exec.Command(binary(t), append(args, extra...)...)
	cmd.Env, cmd.Stderr, cmd.SysProcAttr = env, os.Stderr, sys
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for range 500 {
		if c, err := net.Dial("unix", sock); err == nil { // bound and listening
			_ = c.Close()
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix:"+sock, dialOpts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if tokenFile {
		if _, err := os.Stat(filepath.Join(dir, "token")); !os.IsNotExist(err) {
			t.Fatal("the token file was not removed")
		}
	}
	return &running{cmd: cmd, client: execv1.NewExecServiceClient(conn)}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return c
}

// dialOpts sign every call as the Hub does: a fresh nonce and the auth
// header for its method (agent/server/auth.go).
var dialOpts = []grpc.DialOption{
	grpc.WithTransportCredentials(insecure.NewCredentials()),
	grpc.WithUnaryInterceptor(func(c context.Context, method string, req, reply any, cc *grpc.ClientConn, inv grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		return inv(sign(c, method), method, req, reply, cc, opts...)
	}),
	grpc.WithStreamInterceptor(func(c context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, str grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		return str(sign(c, method), desc, cc, method, opts...)
	}),
}

func sign(c context.Context, method string) context.Context {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	nonce := hex.EncodeToString(b)
	return metadata.AppendToOutgoingContext(c, server.NonceHeader, nonce, server.AuthHeader, server.CallAuth([]byte(token), nonce, method))
}

func runSh(t *testing.T, r *running, script string) string {
	t.Helper()
	resp, err := r.client.Run(ctx(t), &execv1.RunRequest{ContainerId: "c-bin", Command: &execv1.Command{Shell: script}})
	if err != nil {
		t.Fatal(err)
	}
	return string(resp.Stdout)
}

func TestBinaryServesAndHidesItsSecrets(t *testing.T) {
	for _, fromFile := range []bool{false, true} {
		r := startAgent(t, nil, fromFile)
		env := runSh(t, r, "env")
		if strings.Contains(env, "SANDHUB") || strings.Contains(env, token) || !strings.Contains(env, "VISIBLE=yes") {
			t.Fatalf("children's environment: %q", env)
		}
	}
	// With an env file, that is the container's environment (and --env on top).
	ef := filepath.Join(t.TempDir(), "env")
	if err := os.WriteFile(ef, []byte("# comment\nPATH=/usr/bin:/bin\nFROMFILE=1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, nil, false, "--env-file", ef, "--env", "EXTRA=2")
	env := runSh(t, r, "env")
	if !strings.Contains(env, "FROMFILE=1") || !strings.Contains(env, "EXTRA=2") || strings.Contains(env, "VISIBLE") {
		t.Fatalf("children's environment: %q", env)
	}
}

// SIGTERM goes to the commands' groups, then the agent exits.
func TestBinaryForwardsSIGTERM(t *testing.T) {
	r := startAgent(t, nil, false)
	s, err := r.client.Exec(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	_ = s.Send(&execv1.ExecRequest{Msg: &execv1.ExecRequest_Start{Start: &execv1.ExecStart{ContainerId: "c-bin",
		Command: &execv1.Command{Shell: "trap 'echo term; exit 0' TERM; echo ready; while :; do sleep 0.05; done"}}}})
	var out string
	for !strings.Contains(out, "ready") {
		m, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		out += string(m.GetStdout())
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	for {
		m, err := s.Recv()
		if err != nil {
			break
		}
		out += string(m.GetStdout())
	}
	if !strings.Contains(out, "term") {
		t.Fatalf("the command did not get SIGTERM: %q", out)
	}
	if err := r.cmd.Wait(); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
}

// As pid 1 of a new pid namespace (root only: CLONE_NEWPID needs it; CI runs
// the tests as root), the agent reaps orphans and still reports each of its
// commands' own exit codes.
func TestBinaryAsPID1ReapsOrphans(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("ROOT-ONLY: needs CLONE_NEWPID; runs in CI as root")
	}
	r := startAgent(t, &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}, false)
	if got := strings.TrimSpace(runSh(t, r, "echo $PPID")); got != "1" {
		t.Fatalf("the agent is not pid 1 (the command's parent is %s)", got)
	}
	for i := range 20 {
		resp, err := r.client.Run(ctx(t), &execv1.RunRequest{ContainerId: "c-bin",
			Command: &execv1.Command{Shell: "(sleep 0.05 &) ; (true &) ; exit " + strconv.Itoa(i)}})
		if err != nil || resp.ExitStatus.ExitCode != int32(i) {
			t.Fatalf("%d: %v %v", i, err, resp)
		}
	}
	// Every orphan ends as a zombie child of the agent unless it is reaped:
	// look at the agent's children from outside (host pids).
	agent := strconv.Itoa(r.cmd.Process.Pid)
	for range 500 {
		zombies := 0
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
			if err != nil {
				continue
			}
			s := string(b)
			f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
			if len(f) > 1 && f[1] == agent {
				if f[0] == "Z" {
					zombies++
				}
			}
		}
		if zombies == 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("zombies of the agent were not reaped")
}

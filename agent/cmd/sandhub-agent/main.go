// Command sandhub-agent serves sandhub.exec.v1.ExecService inside a
// container, as its init (pid 1). See agent/README.md.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sandhub/sandhub/agent/reaper"
	"github.com/sandhub/sandhub/agent/server"
	"golang.org/x/sys/unix"
)

// stopGrace: on SIGTERM/SIGINT the commands' groups get the signal and this
// long to end before the agent exits (as pid 1, its exit ends the rest).
const stopGrace = 5 * time.Second

type envList []string

func (e *envList) String() string     { return strings.Join(*e, ",") }
func (e *envList) Set(v string) error { *e = append(*e, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sandhub-agent:", err)
		os.Exit(2)
	}
}

func run() error {
	listen := flag.String("listen", "", "unix:/path/agent.sock or tcp:HOST:PORT")
	tokenFile := flag.String("token-file", "", "file holding the token (removed after reading when writable); else env SANDHUB_AGENT_TOKEN")
	containerID := flag.String("container-id", os.Getenv("SANDHUB_CONTAINER_ID"), "the only container_id accepted (env SANDHUB_CONTAINER_ID)")
	workDir := flag.String("workdir", "/work", "default cwd and base of relative paths")
	stateDir := flag.String("state-dir", "/run/sandhub", "where background processes' output rings live (inside the container)")
	envFile := flag.String("env-file", "", "the container's environment for commands, KEY=VALUE lines; else the agent's own minus SANDHUB_*")
	var envs envList
	flag.Var(&envs, "env", "KEY=VALUE added to the commands' environment (repeatable)")
	ringBytes := flag.Int64("ring-bytes", 1<<20, "output buffer per background stream, bytes")
	maxProcs := flag.Int("max-processes", 64, "background processes kept per container")
	flag.Parse()

	token, err := readToken(*tokenFile)
	if err != nil {
		return err
	}
	if *containerID == "" {
		return errors.New("--container-id (or SANDHUB_CONTAINER_ID) is required")
	}
	env, err := baseEnv(*envFile, envs)
	if err != nil {
		return err
	}
	lis, err := listener(*listen)
	if err != nil {
		return err
	}
	r := reaper.New()
	srv, err := server.New(server.Config{
		Token: token, ContainerID: *containerID, WorkDir: *workDir, StateDir: *stateDir,
		Env: env, RingBytes: *ringBytes, MaxProcesses: *maxProcs,
	}, r)
	if err != nil {
		return err
	}
	g := srv.GRPCServer()
	stop := make(chan os.Signal, 2)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-stop
		forward(r, sig.(syscall.Signal))
		g.Stop()
	}()
	return g.Serve(lis)
}

// forward sends sig to every command's process group and waits a bounded
// time for them to end.
func forward(r *reaper.Reaper, sig syscall.Signal) {
	for _, pid := range r.Pids() {
		_ = unix.Kill(-pid, sig)
	}
	deadline := time.Now().Add(stopGrace)
	for r.Running() > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

// readToken takes the credential from a file (removed after, when it can be)
// or from SANDHUB_AGENT_TOKEN, which is then unset so no child inherits it.
func readToken(file string) ([]byte, error) {
	var tok string
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("reading the token: %w", err)
		}
		tok = strings.TrimSpace(string(b))
		_ = os.Remove(file) // fails on a read-only mount: fine
	} else {
		tok = os.Getenv("SANDHUB_AGENT_TOKEN")
	}
	_ = os.Unsetenv("SANDHUB_AGENT_TOKEN")
	if len(tok) < 16 || len(tok) > 1024 {
		return nil, errors.New("the token (--token-file or SANDHUB_AGENT_TOKEN) must be 16-1024 characters")
	}
	return []byte(tok), nil
}

// baseEnv is the commands' environment: the env file's lines, else the
// agent's own environment without its SANDHUB_* settings; --env on top.
func baseEnv(file string, extra []string) ([]string, error) {
	var env []string
	if file != "" {
		f, err := os.Open(file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			if line := sc.Text(); strings.Contains(line, "=") && !strings.HasPrefix(line, "#") {
				env = append(env, line)
			}
		}
		if err := sc.Err(); err != nil {
			return nil, err
		}
	} else {
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "SANDHUB_") {
				env = append(env, kv)
			}
		}
	}
	for _, kv := range extra {
		if !strings.Contains(kv, "=") {
			return nil, fmt.Errorf("--env %q: want KEY=VALUE", kv)
		}
		env = append(env, kv)
	}
	return env, nil
}

func listener(spec string) (net.Listener, error) {
	switch {
	case strings.HasPrefix(spec, "unix:"):
		path := strings.TrimPrefix(spec, "unix:")
		_ = os.Remove(path) // a stale socket of a previous run
		lis, err := net.Listen("unix", path)
		if err == nil {
			_ = os.Chmod(path, 0o600)
		}
		return lis, err
	case strings.HasPrefix(spec, "tcp:"):
		return net.Listen("tcp", strings.TrimPrefix(spec, "tcp:"))
	}
	return nil, errors.New("--listen must be unix:/path or tcp:HOST:PORT")
}

// Command sandhub-agent serves sandhub.exec.v1.ExecService inside a
// container, as its init (pid 1). See agent/README.md.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sandhub/sandhub/agent/reaper"
	"github.com/sandhub/sandhub/agent/server"
)

// stopGrace: on SIGTERM/SIGINT the commands' groups get the signal and this
// long to end before the agent exits (as pid 1, its exit ends the rest).
const stopGrace = 5 * time.Second

type envList []string

func (e *envList) String() string     { return strings.Join(*e, ",") }
func (e *envList) Set(v string) error { *e = append(*e, v); return nil }

func main() {
	if len(os.Args) >= 2 && os.Args[1] == "install" {
		if err := installCommand(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "sandhub-agent install:", err)
			os.Exit(2)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sandhub-agent:", err)
		os.Exit(2)
	}
}

func run() error {
	listen := flag.String("listen", "", "unix:/path/agent.sock, tcp:HOST:PORT, or fd:N (an inherited listening socket)")
	tokenFile := flag.String("token-file", "", "file holding the token (removed after reading when writable); else env SANDHUB_AGENT_TOKEN")
	tokenFD := flag.Int("token-fd", -1, "read the token from this inherited fd (pipe or memfd), then close it")
	readyFD := flag.Int("ready-fd", -1, "write \"R\" to this inherited fd once serving, then close it")
	containerID := flag.String("container-id", os.Getenv("SANDHUB_CONTAINER_ID"), "the only container_id accepted (env SANDHUB_CONTAINER_ID)")
	workDir := flag.String("workdir", "/work", "default cwd and base of relative paths")
	stateDir := flag.String("state-dir", "/run/sandhub", "where background processes' output rings live (inside the container)")
	envFile := flag.String("env-file", "", "the container's environment for commands, KEY=VALUE lines; else the agent's own minus SANDHUB_*")
	envFD := flag.Int("env-fd", -1, "read the commands' environment (NUL-separated KEY=VALUE, values may hold newlines) from this inherited fd, then close it")
	openFiles := flag.Uint64("open-files", 0, "RLIMIT_NOFILE (soft and hard) of the agent and every command it starts; 0 leaves it")
	var envs envList
	flag.Var(&envs, "env", "KEY=VALUE added to the commands' environment (repeatable)")
	ringBytes := flag.Int64("ring-bytes", 1<<20, "output buffer per background stream, bytes")
	maxProcs := flag.Int("max-processes", 64, "background processes kept per container")
	flag.Parse()
	surviveBrokenPipes()

	token, err := readToken(*tokenFile, *tokenFD)
	if err != nil {
		return err
	}
	if *containerID == "" {
		return errors.New("--container-id (or SANDHUB_CONTAINER_ID) is required")
	}
	env, err := baseEnv(*envFile, *envFD, envs)
	if err != nil {
		return err
	}
	lis, err := listener(*listen)
	if err != nil {
		return err
	}
	// After the inherited fds were taken over (they may be numbered above
	// the limit) and before any command starts. Setrlimit also stops Go from
	// handing children its own raised soft limit.
	if *openFiles > 0 {
		lim := syscall.Rlimit{Cur: *openFiles, Max: *openFiles}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return fmt.Errorf("--open-files %d: %w", *openFiles, err)
		}
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
	if err := detachStdio(); err != nil {
		return fmt.Errorf("pointing stdio at /dev/null: %w", err)
	}
	// The listener already accepts (the kernel queues connections), so the
	// agent is ready before Serve's loop runs.
	if err := ready(*readyFD); err != nil {
		return err
	}
	return g.Serve(lis)
}

// ready tells whoever started the agent that it serves: one byte "R" on fd,
// which is then closed (so no command inherits it).
func ready(fd int) error {
	if fd < 0 {
		return nil
	}
	f := os.NewFile(uintptr(fd), "ready-fd")
	if f == nil {
		return fmt.Errorf("--ready-fd %d is not open", fd)
	}
	defer f.Close()
	if _, err := f.Write([]byte("R")); err != nil {
		return fmt.Errorf("--ready-fd %d: %w", fd, err)
	}
	return nil
}

// forward sends sig to every command's process group and waits a bounded
// time for them to end.
func forward(r *reaper.Reaper, sig syscall.Signal) {
	for _, pid := range r.Pids() {
		r.Kill(pid, sig, false)
	}
	deadline := time.Now().Add(stopGrace)
	for r.Running() > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

// maxTokenBytes bounds what is read from a token file or fd (the token is at
// most 1024 characters; a little more for a newline).
const maxTokenBytes = 1100

// readToken takes the credential from an fd (closed after), a file (removed
// after, when it can be) or SANDHUB_AGENT_TOKEN, which is then unset so no
// child inherits it.
func readToken(file string, fd int) ([]byte, error) {
	var tok string
	if fd >= 0 {
		f := os.NewFile(uintptr(fd), "token-fd")
		if f == nil {
			return nil, fmt.Errorf("--token-fd %d is not open", fd)
		}
		b, err := readAllFrom(f, maxTokenBytes)
		_ = f.Close()
		if err != nil {
			return nil, fmt.Errorf("reading the token from fd %d: %w", fd, err)
		}
		tok = strings.TrimSpace(string(b))
	} else if file != "" {
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
		return nil, errors.New("the token (--token-fd, --token-file or SANDHUB_AGENT_TOKEN) must be 16-1024 characters")
	}
	return []byte(tok), nil
}

// maxEnvBytes bounds what --env-fd reads (256 variables of 32 KiB fit).
const maxEnvBytes = 16 << 20

// baseEnv is the commands' environment: the env fd's or file's entries, else
// the agent's own environment without its SANDHUB_* settings; --env on top.
func baseEnv(file string, fd int, extra []string) ([]string, error) {
	var env []string
	if fd >= 0 {
		f := os.NewFile(uintptr(fd), "env-fd")
		if f == nil {
			return nil, fmt.Errorf("--env-fd %d is not open", fd)
		}
		b, err := readAllFrom(f, maxEnvBytes)
		_ = f.Close()
		if err != nil {
			return nil, fmt.Errorf("--env-fd %d: %w", fd, err)
		}
		for _, kv := range strings.Split(string(b), "\x00") {
			if strings.Contains(kv, "=") {
				env = append(env, kv)
			}
		}
	} else if file != "" {
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

// readAllFrom reads an inherited fd whole, at most max bytes (more is an
// error): a memfd from its start whatever its offset (the parent wrote it and
// left the offset at its end), a pipe until EOF.
func readAllFrom(f *os.File, max int) ([]byte, error) {
	var r io.Reader = f
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		r = f // a pipe: not seekable, read as it comes
	}
	b, err := io.ReadAll(io.LimitReader(r, int64(max)+1))
	if err != nil {
		return nil, err
	}
	if len(b) > max {
		return nil, fmt.Errorf("more than %d bytes", max)
	}
	return b, nil
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
	case strings.HasPrefix(spec, "fd:"):
		// A socket the parent bound and listens on (the local backend: its
		// path is on the host, out of the container's reach).
		fd, err := strconv.Atoi(strings.TrimPrefix(spec, "fd:"))
		if err != nil || fd < 0 {
			return nil, fmt.Errorf("--listen %s: want fd:N", spec)
		}
		f := os.NewFile(uintptr(fd), "listen-fd")
		if f == nil {
			return nil, fmt.Errorf("--listen %s: fd not open", spec)
		}
		defer f.Close() // FileListener dups it
		lis, err := net.FileListener(f)
		if err != nil {
			return nil, fmt.Errorf("--listen %s: %w", spec, err)
		}
		return lis, nil
	}
	return nil, errors.New("--listen must be unix:/path, tcp:HOST:PORT or fd:N")
}

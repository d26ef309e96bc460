package server

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/sandhub/sandhub/agent/reaper"
	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/durationpb"
)

const (
	maxCommandBytes = 128 << 10
	defaultPath     = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	shell           = "/bin/sh"
)

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// spec is a checked command, ready to start.
type spec struct {
	path string // argv[0] resolved in PATH
	argv []string
	env  []string
	dir  string
}

// commandSpec checks a Command (naming field's parts in errors) and resolves
// what it runs; every rule of the contract's Command is here.
func (s *Server) commandSpec(c *execv1.Command, field string) (spec, error) {
	if c == nil {
		return spec{}, invalidField(field, "is missing: give argv or shell")
	}
	var argv []string
	switch {
	case len(c.Argv) > 0 && c.Shell != "":
		return spec{}, invalidField(field, "give either argv or shell, not both")
	case c.Shell != "":
		argv = []string{shell, "-c", c.Shell}
	case len(c.Argv) > 0:
		argv = c.Argv
	default:
		return spec{}, invalidField(field+".argv", "is empty: give argv or shell")
	}
	if argv[0] == "" {
		return spec{}, invalidField(field+".argv", "must name a program (argv[0] is empty)")
	}
	size := len(c.Cwd)
	for _, a := range argv {
		size += len(a) + 1
		if strings.IndexByte(a, 0) >= 0 {
			return spec{}, invalidField(field, "contains a NUL character")
		}
	}
	for k, v := range c.Env {
		size += len(k) + len(v) + 2
		if !envName.MatchString(k) {
			return spec{}, invalidField(field+".env", fmt.Sprintf("%q is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)", k))
		}
		if strings.IndexByte(v, 0) >= 0 {
			return spec{}, invalidField(field, "contains a NUL character")
		}
	}
	if size > maxCommandBytes {
		return spec{}, invalidField(field, fmt.Sprintf("is %d bytes; at most %d", size, maxCommandBytes))
	}
	if strings.IndexByte(c.Cwd, 0) >= 0 {
		return spec{}, invalidField(field, "contains a NUL character")
	}
	dir := c.Cwd
	if dir == "" {
		dir = s.cfg.WorkDir
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			dir = "/"
		}
	} else if !strings.HasPrefix(dir, "/") {
		return spec{}, invalidField(field+".cwd", "must be an absolute path")
	} else if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return spec{}, invalidField(field+".cwd", fmt.Sprintf("%q is not a directory in the container", dir))
	}
	env := mergeEnv(s.cfg.Env, c.Env)
	path, err := lookPath(argv[0], env, dir)
	if err != nil {
		return spec{}, invalidField(field+".argv", fmt.Sprintf("%q: %v", argv[0], err))
	}
	return spec{path: path, argv: argv, env: env, dir: dir}, nil
}

// mergeEnv puts extra on top of base (extra wins), keeping base's order.
func mergeEnv(base []string, extra map[string]string) []string {
	env := make([]string, 0, len(base)+len(extra))
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if _, over := extra[k]; !over {
			env = append(env, kv)
		}
	}
	for k, v := range extra {
		env = append(env, k+"="+v)
	}
	return env
}

func lookPath(name string, env []string, dir string) (string, error) {
	if strings.Contains(name, "/") {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		return p, executable(p)
	}
	pathVar := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathVar = v
		}
	}
	for _, d := range filepath.SplitList(pathVar) {
		if d == "" {
			d = "."
		}
		p := filepath.Join(d, name)
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if executable(p) == nil {
			return p, nil
		}
	}
	return "", errors.New("not found in the container")
}

func executable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return errors.New("not found in the container")
	}
	if st.IsDir() || unix.Access(p, unix.X_OK) != nil {
		return errors.New("not executable")
	}
	return nil
}

// child is a started command: its process group leader and our pipe ends.
type child struct {
	pid    int
	done   <-chan unix.WaitStatus
	stdin  *os.File // nil when stdin was not asked for
	stdout *os.File
	stderr *os.File // nil with a PTY
	pty    *os.File // the terminal's master, with a PTY (== stdin == stdout)
	start  time.Time
}

// ioMode says how a command's stdio is wired.
type ioMode struct {
	stdin bool            // a pipe we write to; else an empty, closed stdin
	pty   *execv1.PtySize // non-nil: one terminal for all three
	// background: what the command leaves running outlives it (StartProcess);
	// else its group (with a terminal, its whole session) ends with it.
	background bool
}

// pipe returns (ours, theirs) with ours non-blocking (the runtime poller
// then serves reads with deadlines and Close interrupts them).
func pipe(oursReads bool) (ours, theirs *os.File, err error) {
	var p [2]int
	if err = unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, nil, err
	}
	r, w := p[0], p[1]
	if !oursReads {
		r, w = w, r
	}
	_ = unix.SetNonblock(r, true)
	return os.NewFile(uintptr(r), "pipe"), os.NewFile(uintptr(w), "pipe"), nil
}

func closeAll(fs ...*os.File) {
	for _, f := range fs {
		if f != nil {
			_ = f.Close()
		}
	}
}

// start runs sp in its own process group (its own session with a PTY).
func (s *Server) start(sp spec, mode ioMode) (*child, error) {
	c := &child{}
	var theirs []*os.File
	defer func() { closeAll(theirs...) }()
	sys := &syscall.SysProcAttr{}
	var files []uintptr
	if mode.pty != nil {
		master, slave, err := openPTY(mode.pty)
		if err != nil {
			return nil, err
		}
		theirs = append(theirs, slave)
		c.pty, c.stdin, c.stdout = master, master, master
		files = []uintptr{slave.Fd(), slave.Fd(), slave.Fd()}
		sys.Setsid, sys.Setctty, sys.Ctty = true, true, 0
	} else {
		inOurs, inTheirs, err := pipe(false)
		if err != nil {
			return nil, err
		}
		theirs = append(theirs, inTheirs)
		if mode.stdin {
			c.stdin = inOurs
		} else {
			_ = inOurs.Close() // an empty stdin: EOF at once
		}
		outOurs, outTheirs, err := pipe(true)
		if err != nil {
			closeAll(c.stdin)
			return nil, err
		}
		theirs = append(theirs, outTheirs)
		errOurs, errTheirs, err := pipe(true)
		if err != nil {
			closeAll(c.stdin, outOurs)
			return nil, err
		}
		theirs = append(theirs, errTheirs)
		c.stdout, c.stderr = outOurs, errOurs
		files = []uintptr{inTheirs.Fd(), outTheirs.Fd(), errTheirs.Fd()}
		sys.Setpgid = true
	}
	end := reaper.EndGroup
	switch {
	case mode.background:
		end = reaper.EndAlone
	case mode.pty != nil:
		end = reaper.EndSession // an interactive shell's jobs have their own groups
	}
	c.start = time.Now()
	pid, done, err := s.r.Start(sp.path, sp.argv, &syscall.ProcAttr{Dir: sp.dir, Env: sp.env, Files: files, Sys: sys}, end)
	if err != nil {
		closeAll(c.stdin, c.stdout, c.stderr)
		return nil, err
	}
	c.pid, c.done = pid, done
	return c, nil
}

// startErr maps a failed start: the command's own fault is INVALID_ARGUMENT;
// a fork refused by the container's pids limit (EAGAIN: cgroup pids.max or
// RLIMIT_NPROC) is that quota, RESOURCE_EXHAUSTED QUOTA_EXCEEDED limit
// "pids" (the caller's to free, as before the agent); other short resources
// are UNAVAILABLE (nothing ran; retry).
func startErr(err error, field string, sp spec) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case unix.ENOENT, unix.EACCES, unix.ENOEXEC, unix.EISDIR, unix.ENOTDIR, unix.ELOOP:
			return invalidField(field+".argv", fmt.Sprintf("%q: %v", sp.argv[0], errno))
		case unix.EAGAIN:
			return quotaExceeded("the container holds as many processes as its pids limit allows; "+
				"end some of its processes and retry", "pids")
		case unix.ENOMEM, unix.EMFILE, unix.ENFILE:
			return unavailable(fmt.Sprintf("the container is short of resources (%v); the command was not started, retry", errno))
		case unix.ENOSPC:
			return quotaExceeded("the container holds all the pseudo-terminals it may; close some or run without a PTY", "ptys")
		}
	}
	return internal("starting the command failed")
}

// kill signals the command's process group (with a terminal, session: its
// whole session), only while the command is not reaped (its pid may be
// another process's after that).
func (s *Server) kill(c *child, sig unix.Signal, session bool) {
	s.r.Kill(c.pid, sig, session && c.pty != nil)
}

// exitStatus converts a wait status (timedOut: we killed it for its timeout).
func exitStatus(ws unix.WaitStatus, timedOut, oom bool) *execv1.ExitStatus {
	st := &execv1.ExitStatus{TimedOut: timedOut, OomKilled: oom}
	if ws.Signaled() {
		n := int32(ws.Signal())
		st.ExitCode, st.SignalNumber = -1, n
		if _, named := execv1.Signal_name[n]; named {
			st.Signal = execv1.Signal(n)
		}
	} else {
		st.ExitCode = int32(ws.ExitStatus())
	}
	return st
}

// signalNumber is the Linux number of a Signal; UNSPECIFIED means SIGTERM.
func signalNumber(sig execv1.Signal, field string) (unix.Signal, error) {
	if sig == execv1.Signal_SIGNAL_UNSPECIFIED {
		return unix.SIGTERM, nil
	}
	if _, ok := execv1.Signal_name[int32(sig)]; !ok {
		return 0, invalidField(field, "name a signal, e.g. SIGNAL_SIGTERM")
	}
	return unix.Signal(sig), nil
}

// timeoutOf reads a Duration: zero means def; above maxD or negative is invalid.
func timeoutOf(d *durationpb.Duration, def, maxD time.Duration, field string) (time.Duration, error) {
	if d == nil {
		return def, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, invalidField(field, "is not a valid duration")
	}
	v := d.AsDuration()
	switch {
	case v < 0:
		return 0, invalidField(field, "must not be negative")
	case v == 0:
		return def, nil
	case v > maxD:
		return 0, invalidField(field, fmt.Sprintf("at most %v", maxD))
	}
	return v, nil
}

func checkPTY(p *execv1.PtySize, field string) error {
	if p.Rows < 1 || p.Rows > 1000 || p.Cols < 1 || p.Cols > 1000 {
		return invalidField(field, "rows and cols must be 1..1000")
	}
	return nil
}

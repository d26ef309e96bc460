// Package reaper starts the agent's commands and collects every child's exit.
//
// The agent is its container's init (pid 1) or, when it is not, a child
// subreaper: either way orphaned grandchildren are re-parented to it and must
// be reaped, or they stay zombies and use up the container's pids. One loop
// waits for *any* child (wait4(-1)) on each SIGCHLD and hands each exit status
// to the command that started that pid; unknown pids (orphans) are just
// reaped. Commands are started with ForkExec under the same lock the loop
// takes, so a child that exits at once cannot be reaped before its pid is
// registered. Nothing else in the process may wait for children (os/exec's
// Wait would race with this loop), so every command goes through Start.
//
// Signals never hit a reused pid: once a pid was reaped the kernel may hand
// it (and so its process group and session id) to any new process, so Kill
// signals a command only while it is not reaped, under the lock the reaping
// takes; and what must end with a command (its group, with a terminal its
// whole session) is killed at its exit *before* it is reaped, while its
// zombie still holds the pid.
package reaper

import (
	"bytes"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Reaper owns the process's children.
type Reaper struct {
	mu      sync.Mutex
	waiting map[int]*started
	orphans uint64
}

type started struct {
	done chan unix.WaitStatus
	end  End
}

// End says what is killed (SIGKILL) when a command exits, before it is reaped.
type End int

const (
	// EndAlone kills nothing else (a background process: what it left
	// behind may go on).
	EndAlone End = iota
	// EndGroup kills the command's process group.
	EndGroup
	// EndSession kills its group and every process of its session (a
	// terminal's shell: its background jobs have groups of their own).
	EndSession
)

// safetyTick re-checks for children without a SIGCHLD. Coalesced SIGCHLDs
// are already covered (each wake-up reaps every exited child); this is a
// belt-and-braces bound, slow so that an idle agent stays idle.
const safetyTick = 30 * time.Second

// New starts the reaping loop. It also makes the process a child subreaper
// when it is not pid 1, so orphans come to it in tests as they do in a
// container.
func New() *Reaper {
	r := &Reaper{waiting: map[int]*started{}}
	if os.Getpid() != 1 {
		_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGCHLD)
	go func() {
		tick := time.NewTicker(safetyTick)
		defer tick.Stop()
		for {
			select {
			case <-sigs:
			case <-tick.C:
			}
			r.reap()
		}
	}()
	return r
}

func (r *Reaper) reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		// Look first (WNOWAIT): the zombie keeps its pid, so its group and
		// session cannot be reused while they are killed.
		var info unix.Siginfo
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
		if err == unix.EINTR {
			continue
		}
		pid := siginfoPid(&info)
		if err != nil || pid <= 0 {
			return
		}
		st := r.waiting[pid]
		if st != nil && st.end != EndAlone {
			_ = unix.Kill(-pid, unix.SIGKILL)
			if st.end == EndSession {
				killSession(pid, unix.SIGKILL)
			}
		}
		var ws unix.WaitStatus
		if _, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err == unix.EINTR {
			continue
		}
		if st != nil {
			delete(r.waiting, pid)
			st.done <- ws // buffered: never blocks
		} else {
			r.orphans++
		}
	}
}

// siginfoPid is si_pid: the first field of siginfo's union, after three
// ints aligned to a pointer (offset 16 on 64-bit Linux, 12 on 32-bit).
func siginfoPid(info *unix.Siginfo) int {
	off := uintptr(12)
	if unsafe.Sizeof(uintptr(0)) == 8 {
		off = 16
	}
	return int(*(*int32)(unsafe.Add(unsafe.Pointer(info), off)))
}

// Kill signals pid's process group (EndSession: and its whole session) if
// pid was started here and is not reaped yet; it says whether it did.
func (r *Reaper) Kill(pid int, sig unix.Signal, session bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if pid <= 0 || r.waiting[pid] == nil {
		return false
	}
	_ = unix.Kill(-pid, sig)
	if session {
		killSession(pid, sig)
	}
	return true
}

// killSession signals every process whose session id is sid, found in /proc
// (the agent is the container's init: it sees them all). A few passes catch
// what forked during the previous one.
func killSession(sid int, sig unix.Signal) {
	for range 5 {
		entries, err := os.ReadDir("/proc")
		if err != nil {
			return
		}
		hit := 0
		for _, e := range entries {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == sid {
				continue
			}
			b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
			if err != nil {
				continue
			}
			// After "pid (comm) ": state ppid pgrp session ...
			i := bytes.LastIndexByte(b, ')')
			if i < 0 {
				continue
			}
			f := strings.Fields(string(b[i+1:]))
			if len(f) < 4 || f[0] == "Z" || f[3] != strconv.Itoa(sid) {
				continue
			}
			_ = unix.Kill(pid, sig)
			hit++
		}
		if hit == 0 {
			return
		}
	}
}

// Orphans is how many children nobody waited for were reaped so far.
func (r *Reaper) Orphans() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.orphans
}

// Start forks and execs; the channel receives the child's exit status once,
// after what end names was killed.
func (r *Reaper) Start(path string, argv []string, attr *syscall.ProcAttr, end End) (int, <-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := syscall.ForkExec(path, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	c := make(chan unix.WaitStatus, 1)
	r.waiting[pid] = &started{done: c, end: end}
	return pid, c, nil
}

// Running is how many started commands have not been reaped yet.
func (r *Reaper) Running() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.waiting)
}

// Pids lists the started commands not reaped yet (for forwarding signals).
func (r *Reaper) Pids() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	pids := make([]int, 0, len(r.waiting))
	for pid := range r.waiting {
		pids = append(pids, pid)
	}
	return pids
}

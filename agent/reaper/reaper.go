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
package reaper

import (
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Reaper owns the process's children.
type Reaper struct {
	mu      sync.Mutex
	waiting map[int]chan unix.WaitStatus
	orphans uint64
}

// safetyTick re-checks for children without a SIGCHLD. Coalesced SIGCHLDs
// are already covered (each wake-up reaps every exited child); this is a
// belt-and-braces bound, slow so that an idle agent stays idle.
const safetyTick = 30 * time.Second

// New starts the reaping loop. It also makes the process a child subreaper
// when it is not pid 1, so orphans come to it in tests as they do in a
// container.
func New() *Reaper {
	r := &Reaper{waiting: map[int]chan unix.WaitStatus{}}
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
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if ws.Stopped() || ws.Continued() {
			continue
		}
		if c, ok := r.waiting[pid]; ok {
			delete(r.waiting, pid)
			c <- ws // buffered: never blocks
		} else {
			r.orphans++
		}
	}
}

// Orphans is how many children nobody waited for were reaped so far.
func (r *Reaper) Orphans() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.orphans
}

// Start forks and execs; the channel receives the child's exit status once.
func (r *Reaper) Start(path string, argv []string, attr *syscall.ProcAttr) (int, <-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := syscall.ForkExec(path, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	c := make(chan unix.WaitStatus, 1)
	r.waiting[pid] = c
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

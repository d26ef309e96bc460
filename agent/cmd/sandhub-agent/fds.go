package main

import (
	"os"
	"os/signal"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// surviveBrokenPipes keeps a write to a closed pipe from killing the agent
// (pid 1: the container would go with it). Go kills the process for EPIPE on
// fd 1 or 2 unless SIGPIPE is Notify'd; signal.Ignore would do too, but an
// ignored signal stays ignored across exec, so every command would inherit
// it (`yes | head` would spin on EPIPE). A Notify'd signal is reset to the
// default in children; the channel is never read (sends to a full channel
// are dropped).
func surviveBrokenPipes() {
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
}

// detachStdio points fd 0, 1 and 2 at /dev/null, once the inherited fds
// were taken over and start-up errors can no longer happen. The agent's
// stderr is often a pipe whose reader went away (the local backend's
// start-up pipe): gRPC's logging or a panic writing there must not matter.
// Every other fd gets close-on-exec, so a command sees only its 0-2 whatever
// the agent inherited.
func detachStdio() error {
	null, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	for fd := 0; fd <= 2; fd++ {
		if fd != null {
			if err := unix.Dup3(null, fd, 0); err != nil {
				return err
			}
		}
	}
	if null > 2 {
		_ = unix.Close(null)
	} else if _, err := unix.FcntlInt(uintptr(null), unix.F_SETFD, 0); err != nil {
		return err
	}
	return closeOnExecFrom(3)
}

// closeOnExecFrom marks every fd >= first close-on-exec: close_range(2)
// (Linux 5.11) or, on older kernels, one fcntl per entry of /proc/self/fd.
func closeOnExecFrom(first int) error {
	if unix.CloseRange(uint(first), ^uint(0), unix.CLOSE_RANGE_CLOEXEC) == nil {
		return nil
	}
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd >= first {
			_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC) // EBADF: the walk's own fd
		}
	}
	return nil
}

package server

// The terminal is opened with golang.org/x/sys/unix directly (no creack/pty):
// it is thirty lines, x/sys is already a dependency of grpc, and the child
// side is wired by syscall.ForkExec's Setsid/Setctty, which creack/pty would
// not do for us since the reaper owns process start.

import (
	"fmt"
	"os"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
)

func openPTY(size *execv1.PtySize) (master, slave *os.File, err error) {
	m, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	fail := func(e error) (*os.File, *os.File, error) { _ = unix.Close(m); return nil, nil, e }
	if err := unix.IoctlSetPointerInt(m, unix.TIOCSPTLCK, 0); err != nil {
		return fail(err)
	}
	n, err := unix.IoctlGetUint32(m, unix.TIOCGPTN)
	if err != nil {
		return fail(err)
	}
	s, err := unix.Open(fmt.Sprintf("/dev/pts/%d", n), unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(err)
	}
	if err := setSize(m, size); err != nil {
		_ = unix.Close(s)
		return fail(err)
	}
	_ = unix.SetNonblock(m, true)
	return os.NewFile(uintptr(m), "ptmx"), os.NewFile(uintptr(s), "pts"), nil
}

// setSize sets the terminal size; the kernel then sends SIGWINCH to the
// terminal's foreground process group when the size changed.
func setSize(fd int, size *execv1.PtySize) error {
	return unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(size.Rows), Col: uint16(size.Cols)})
}

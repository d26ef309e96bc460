package reaper

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var r = New()

func start(t *testing.T, script string, end End, stdout *os.File) (int, <-chan unix.WaitStatus) {
	t.Helper()
	files := []uintptr{0, 1, 2}
	if stdout != nil {
		files[1] = stdout.Fd()
	}
	pid, done, err := r.Start("/bin/sh", []string{"sh", "-c", script},
		&syscall.ProcAttr{Files: files, Sys: &syscall.SysProcAttr{Setpgid: true}}, end)
	if err != nil {
		t.Fatal(err)
	}
	return pid, done
}

// Once reaped, a command's pid may be any new process's: Kill then sends
// nothing; before, it signals the group.
func TestKillOnlyBeforeReaping(t *testing.T) {
	pid, done := start(t, "exit 7", EndAlone, nil)
	if ws := <-done; ws.ExitStatus() != 7 {
		t.Fatalf("exit: %v", ws)
	}
	if r.Kill(pid, unix.SIGKILL, false) {
		t.Fatal("Kill signalled a reaped pid")
	}
	pid, done = start(t, "sleep 30", EndAlone, nil)
	if !r.Kill(pid, unix.SIGTERM, false) {
		t.Fatal("Kill did not signal a running command")
	}
	if ws := <-done; !ws.Signaled() || ws.Signal() != unix.SIGTERM {
		t.Fatalf("exit: %v", ws)
	}
}

// EndGroup: what the command left in its group is killed at its exit, by
// the reaper, before the command's pid is released; EndAlone leaves it.
func TestEndGroupKillsTheGroupBeforeReaping(t *testing.T) {
	for _, end := range []End{EndGroup, EndAlone} {
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		_, done := start(t, "sleep 30 & echo $!", end, pw)
		_ = pw.Close()
		line, _ := bufio.NewReader(pr).ReadString('\n')
		_ = pr.Close()
		left, err := strconv.Atoi(strings.TrimSpace(line))
		if err != nil {
			t.Fatal(line, err)
		}
		<-done
		alive := func() bool {
			b, err := os.ReadFile("/proc/" + strconv.Itoa(left) + "/stat")
			return err == nil && !strings.Contains(string(b), ") Z ")
		}
		for i := 0; i < 100 && alive(); i++ {
			time.Sleep(10 * time.Millisecond)
		}
		if alive() != (end == EndAlone) {
			t.Fatalf("end %d: the leftover alive = %v", end, alive())
		}
		_ = unix.Kill(left, unix.SIGKILL)
	}
}

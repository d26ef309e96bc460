package server

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

const (
	maxExecTimeout = 24 * time.Hour
	// batchWindow: output waits this long for more before it is sent, so
	// many small writes go out as few messages.
	batchWindow = 2 * time.Millisecond
	// outQueue: reads queued per stream before the readers block (the
	// command then blocks on its full pipe: backpressure, never loss).
	outQueue = 4
)

type execStream = grpc.BidiStreamingServer[execv1.ExecRequest, execv1.ExecResponse]

// Exec runs an interactive command.
func (s *Server) Exec(stream execStream) error {
	first, err := stream.Recv()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return invalidStream("the first message must be start")
		}
		return err
	}
	start := first.GetStart()
	if start == nil {
		return invalidStream("the first message must be start")
	}
	if err := s.checkContainer(start.ContainerId); err != nil {
		return err
	}
	timeout, err := timeoutOf(start.Timeout, maxExecTimeout, maxExecTimeout, "start.timeout")
	if err != nil {
		return err
	}
	if start.Pty != nil {
		if err := checkPTY(start.Pty, "start.pty"); err != nil {
			return err
		}
	}
	sp, err := s.commandSpec(start.Command, "start.command")
	if err != nil {
		return err
	}
	c, err := s.start(sp, ioMode{stdin: true, pty: start.Pty})
	if err != nil {
		return startErr(err, "start.command", sp)
	}
	x := &execution{s: s, c: c, stream: stream}
	return x.serve(timeout)
}

// execution is one Exec call's command and streams.
type execution struct {
	s        *Server
	c        *child
	stream   execStream
	reaped   atomic.Bool
	inClosed bool // by the caller (close_stdin or half-close); recv goroutine only
	inBroken bool // the command closed its stdin; recv goroutine only
}

func (x *execution) serve(timeout time.Duration) error {
	ctx := x.stream.Context()
	c := x.c
	defer func() {
		if !x.reaped.Load() { // the caller went away or the stream failed: kill it all
			x.s.kill(c, unix.SIGKILL, true)
			<-c.done
		}
		closeAll(c.stdout, c.stderr)
		if c.pty == nil {
			closeAll(c.stdin)
		}
	}()
	oom := oomKills()
	if err := x.stream.Send(&execv1.ExecResponse{Msg: &execv1.ExecResponse_Started{
		Started: &execv1.ExecStarted{Pid: int32(c.pid)}}}); err != nil {
		return err
	}

	exited := make(chan struct{})
	var outs [2]chan []byte
	var cut [2]atomic.Bool
	for i, f := range []*os.File{c.stdout, c.stderr} {
		outs[i] = make(chan []byte, outQueue)
		if f == nil {
			close(outs[i])
			continue
		}
		go func() {
			defer close(outs[i])
			cut[i].Store(pump(f, exited, x.s.cfg.DrainIdle, x.s.cfg.DrainMax, func(b []byte) {
				select {
				case outs[i] <- b:
				case <-ctx.Done():
				}
			}))
		}()
	}

	inErr := make(chan error, 1)
	go func() { inErr <- x.readRequests() }()

	timer := time.NewTimer(timeout)
	defer timer.Stop()
	keep := time.NewTimer(x.s.cfg.Keepalive)
	defer keep.Stop()
	var ws unix.WaitStatus
	done := c.done
	timedOut := false
	var pending [2][]byte // a read that did not fit the last batch
	open := 2
	for open > 0 || done != nil {
		var sendErr error
		sent := false
		for i := range pending {
			if pending[i] != nil {
				b := pending[i]
				pending[i] = nil
				sendErr, sent = x.sendBatch(i, outs[i], b, &pending[i]), true
				break
			}
		}
		if !sent {
			select {
			case b, ok := <-outs[0]:
				if !ok {
					outs[0], open = nil, open-1
					continue
				}
				sendErr = x.sendBatch(0, outs[0], b, &pending[0])
			case b, ok := <-outs[1]:
				if !ok {
					outs[1], open = nil, open-1
					continue
				}
				sendErr = x.sendBatch(1, outs[1], b, &pending[1])
			case ws = <-done:
				done = nil
				x.reaped.Store(true)
				// As Run: what the command left in its group (with a
				// terminal, its session) was killed before it was reaped;
				// what it wrote is still read to the end.
				close(exited)
				continue
			case err := <-inErr:
				if err != nil {
					return err
				}
				inErr = nil
				continue
			case <-timer.C:
				timedOut = true
				x.s.kill(c, unix.SIGKILL, true)
				continue
			case <-keep.C:
				sendErr = x.stream.Send(&execv1.ExecResponse{Msg: &execv1.ExecResponse_Keepalive{Keepalive: &execv1.Keepalive{}}})
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if sendErr != nil {
			return sendErr
		}
		keep.Reset(x.s.cfg.Keepalive)
	}
	status := exitStatus(ws, timedOut, oomKilled(ws, oom))
	if err := x.stream.Send(&execv1.ExecResponse{Msg: &execv1.ExecResponse_ExitStatus{ExitStatus: status}}); err != nil {
		return err
	}
	if cut[0].Load() || cut[1].Load() {
		// A process the command left behind kept writing to its output after
		// it exited: exit_status was sent, and the call ends in an error so
		// the caller knows output is missing.
		return timeoutErr(fmt.Sprintf("the command exited, but a process it started kept writing to its output "+
			"for %v more; the output after that was not sent", x.s.cfg.DrainMax))
	}
	// Wait (bounded) for the caller's half-close before ending the call: a
	// client still writing when the status arrives may lose that status (the
	// Hub's grpc.aio reports INTERNAL for a write that loses the race,
	// grpc/grpc#36066). The Hub half-closes as soon as it sees exit_status.
	if inErr != nil {
		linger := time.NewTimer(exitLinger)
		defer linger.Stop()
		select {
		case <-inErr:
		case <-linger.C:
		case <-ctx.Done():
		}
	}
	return nil
}

// exitLinger bounds how long a finished Exec waits for the caller's half-close.
const exitLinger = 2 * time.Second

// sendBatch sends b plus what else arrives on ch within batchWindow, up to
// chunkBytes; a read that does not fit is left in *rest for the next message.
func (x *execution) sendBatch(stream int, ch chan []byte, b []byte, rest *[]byte) error {
	if len(b) < chunkBytes && ch != nil {
		t := time.NewTimer(batchWindow)
	collect:
		for len(b) < chunkBytes {
			select {
			case more, ok := <-ch:
				if !ok {
					break collect // the main loop sees the close again
				}
				if len(b)+len(more) > chunkBytes {
					*rest = more
					break collect
				}
				b = append(b, more...)
			case <-t.C:
				break collect
			}
		}
		t.Stop()
	}
	if stream == 0 {
		return x.stream.Send(&execv1.ExecResponse{Msg: &execv1.ExecResponse_Stdout{Stdout: b}})
	}
	return x.stream.Send(&execv1.ExecResponse{Msg: &execv1.ExecResponse_Stderr{Stderr: b}})
}

// readRequests handles the request stream after start. A stdin write blocks
// while the command does not read (backpressure to the caller).
func (x *execution) readRequests() error {
	for {
		req, err := x.stream.Recv()
		if errors.Is(err, io.EOF) {
			x.closeStdin() // half-close: the caller is done sending
			return nil
		}
		if err != nil {
			return nil // cancelled: the main loop sees the context
		}
		switch m := req.Msg.(type) {
		case *execv1.ExecRequest_Start:
			return invalidStream("start may only be the first message")
		case *execv1.ExecRequest_Stdin:
			if x.inClosed {
				return invalidStream("stdin after close_stdin")
			}
			if !x.inBroken && len(m.Stdin) > 0 {
				if _, err := x.c.stdin.Write(m.Stdin); err != nil {
					x.inBroken = true // the command closed its stdin: drop
				}
			}
		case *execv1.ExecRequest_CloseStdin:
			x.closeStdin()
		case *execv1.ExecRequest_Resize:
			if x.c.pty == nil {
				return invalidField("resize", "the command has no terminal (start.pty was not set)")
			}
			if err := checkPTY(m.Resize, "resize"); err != nil {
				return err
			}
			if !x.reaped.Load() {
				// Not Fd(): it would make the master blocking, and reads
				// would lose their deadlines.
				if rc, err := x.c.pty.SyscallConn(); err == nil {
					_ = rc.Control(func(fd uintptr) { _ = setSize(int(fd), m.Resize) })
				}
			}
		case *execv1.ExecRequest_Signal:
			sig, err := signalNumber(m.Signal, "signal")
			if err != nil {
				return err
			}
			x.s.kill(x.c, sig, false) // not once reaped: the pid may be reused
		default:
			return invalidStream("an empty message: set one of stdin, close_stdin, resize, signal")
		}
	}
}

// closeStdin ends the command's stdin: EOF on a pipe; on a terminal, its EOF
// character (VEOF, read at a line start), since the terminal stays open.
func (x *execution) closeStdin() {
	if x.inClosed {
		return
	}
	x.inClosed = true
	if x.c.pty != nil {
		if !x.inBroken {
			_, _ = x.c.pty.Write([]byte{4})
		}
		return
	}
	_ = x.c.stdin.Close()
}

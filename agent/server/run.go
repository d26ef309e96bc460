package server

import (
	"context"
	"fmt"
	"sync"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

const (
	defaultRunTimeout = 60 * time.Second
	maxRunTimeout     = time.Hour
	defaultOutput     = 1 << 20
	// maxOutput keeps both streams of one RunResponse under gRPC's default
	// 4 MiB receive limit (2 MiB - 32 KiB each).
	maxOutput = 2<<20 - 32<<10
)

// Run runs a command to completion.
func (s *Server) Run(ctx context.Context, req *execv1.RunRequest) (*execv1.RunResponse, error) {
	if err := s.checkContainer(req.ContainerId); err != nil {
		return nil, err
	}
	timeout, err := timeoutOf(req.Timeout, defaultRunTimeout, maxRunTimeout, "timeout")
	if err != nil {
		return nil, err
	}
	limit := int(req.MaxOutputBytes)
	switch {
	case limit < 0 || limit > maxOutput:
		return nil, invalidField("max_output_bytes", fmt.Sprintf("must be 0..%d", maxOutput))
	case limit == 0:
		limit = defaultOutput
	}
	sp, err := s.commandSpec(req.Command, "command")
	if err != nil {
		return nil, err
	}
	c, err := s.start(sp, ioMode{stdin: len(req.Stdin) > 0})
	if err != nil {
		return nil, startErr(err, "command", sp)
	}
	oom := oomKills()
	if c.stdin != nil {
		go func() { // EPIPE when the command does not read it all: fine
			_, _ = c.stdin.Write(req.Stdin)
			_ = c.stdin.Close()
		}()
		defer closeAll(c.stdin) // ends the write if something left behind holds stdin open
	}
	exited := make(chan struct{})
	out, errOut := capped{limit: limit}, capped{limit: limit}
	var wg sync.WaitGroup
	var cutOut, cutErr bool
	wg.Add(2)
	go func() { defer wg.Done(); cutOut = pump(c.stdout, exited, s.cfg.DrainIdle, s.cfg.DrainMax, out.add) }()
	go func() { defer wg.Done(); cutErr = pump(c.stderr, exited, s.cfg.DrainIdle, s.cfg.DrainMax, errOut.add) }()
	defer closeAll(c.stdout, c.stderr)

	timer := time.NewTimer(timeout)
	defer timer.Stop()
	timedOut := false
	var ws unix.WaitStatus
wait:
	for {
		select {
		case ws = <-c.done:
			break wait
		case <-timer.C:
			timedOut = true
			s.kill(c, unix.SIGKILL, false)
		case <-ctx.Done():
			s.kill(c, unix.SIGKILL, false)
			<-c.done
			return nil, ctx.Err()
		}
	}
	// The call ends with the command: what it left running in its group went
	// too (killed by the reaper before it reaped the command; StartProcess is
	// the way to leave something running). Its output already in the pipes
	// is still read to the end.
	close(exited)
	wg.Wait()
	return &execv1.RunResponse{
		ExitStatus:      exitStatus(ws, timedOut, oomKilled(ws, oom)),
		Stdout:          out.data,
		Stderr:          errOut.data,
		StdoutTruncated: out.truncated || cutOut,
		StderrTruncated: errOut.truncated || cutErr,
		StartTime:       timestamppb.New(c.start),
		Duration:        durationpb.New(time.Since(c.start)),
	}, nil
}

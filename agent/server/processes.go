package server

import (
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sandhub/sandhub/agent/ring"
	commonv1 "github.com/sandhub/sandhub/gen/go/sandhub/common/v1"
	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

var processIDRe = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

const (
	defaultPageSize = 100
	maxPageSize     = 1000
	// maxPageBytes cuts a ListProcesses page before the encoded processes
	// reach the caller's 4 MiB receive limit (a command alone may be
	// 128 KiB, so 1000 of them would not fit); one process always fits.
	maxPageBytes = 3<<20 + 512<<10
	// attachRead is the most one AttachProcess chunk carries.
	attachRead = chunkBytes
	// quietPoll: how often an exited process is checked for output still
	// coming from its pipes.
	quietPoll = 20 * time.Millisecond
)

// process is one background process. Its output goes to two rings in the
// state directory; the pipes are read to their end, also after the process
// exited (what it started may go on writing: the rings are bounded).
type process struct {
	id       string
	seq      uint64
	command  *execv1.Command
	pid      int
	start    time.Time
	out, err *ring.Ring
	files    []*os.File
	lastOut  atomic.Int64 // unix nanos of the last read from either pipe
	open     atomic.Int32 // pipes not at EOF yet
	mu       sync.Mutex
	exit     *execv1.ExitStatus // set once EXITED
	end      time.Time
	done     chan struct{} // closed when EXITED
}

type processes struct {
	s     *Server
	mu    sync.Mutex
	byID  map[string]*process
	order []*process // oldest first
	seq   uint64
	dir   string
}

func newProcesses(s *Server) *processes {
	dir := filepath.Join(s.cfg.StateDir, "processes")
	_ = os.RemoveAll(dir) // a new agent is a new container: nothing of a previous one is kept
	_ = os.MkdirAll(dir, 0o700)
	return &processes{s: s, byID: map[string]*process{}, dir: dir}
}

func checkProcessID(id string) error {
	if !processIDRe.MatchString(id) {
		return invalidField("process_id", "1-63 characters of [a-z0-9-], starting with a letter or digit")
	}
	return nil
}

func (ps *processes) get(containerID, id string) (*process, error) {
	if err := checkProcessID(id); err != nil {
		return nil, err
	}
	ps.mu.Lock()
	p := ps.byID[id]
	ps.mu.Unlock()
	if p == nil {
		return nil, fail(codes.NotFound, commonv1.ErrorReason_ERROR_REASON_PROCESS_NOT_FOUND,
			"no background process "+strconv.Quote(id)+" in this container", md{"container_id": containerID, "process_id": id})
	}
	return p, nil
}

// StartProcess starts a background process, or returns the one with that id.
func (s *Server) StartProcess(_ context.Context, req *execv1.StartProcessRequest) (*execv1.StartProcessResponse, error) {
	if err := s.checkContainer(req.ContainerId); err != nil {
		return nil, err
	}
	if err := checkProcessID(req.ProcessId); err != nil {
		return nil, err
	}
	ps := s.procs
	ps.mu.Lock() // held while starting: the same id twice at once starts one
	defer ps.mu.Unlock()
	if p := ps.byID[req.ProcessId]; p != nil {
		return &execv1.StartProcessResponse{Process: p.proto(req.ContainerId)}, nil
	}
	sp, err := s.commandSpec(req.Command, "command")
	if err != nil {
		return nil, err
	}
	if err := ps.makeRoom(); err != nil {
		return nil, err
	}
	p := &process{id: req.ProcessId, command: proto.Clone(req.Command).(*execv1.Command), done: make(chan struct{})}
	base := filepath.Join(ps.dir, p.id)
	if p.out, err = ring.Create(base+".stdout", s.cfg.RingBytes); err != nil {
		return nil, storageErr(err)
	}
	if p.err, err = ring.Create(base+".stderr", s.cfg.RingBytes); err != nil {
		p.out.Remove()
		return nil, storageErr(err)
	}
	c, err := s.start(sp, ioMode{background: true})
	if err != nil {
		p.out.Remove()
		p.err.Remove()
		return nil, startErr(err, "command", sp)
	}
	ps.seq++
	p.seq, p.pid, p.start = ps.seq, c.pid, c.start
	p.files = []*os.File{c.stdout, c.stderr}
	ps.byID[p.id] = p
	ps.order = append(ps.order, p)
	p.run(c, s.cfg)
	return &execv1.StartProcessResponse{Process: p.proto(req.ContainerId), Created: true}, nil
}

func storageErr(err error) error {
	if os.IsExist(err) {
		return unavailable("the process's output files are still being removed; retry")
	}
	if e, ok := err.(*os.PathError); ok && e.Err == unix.ENOSPC {
		return fail(codes.ResourceExhausted, commonv1.ErrorReason_ERROR_REASON_QUOTA_EXCEEDED,
			"the container's disk is full: no room for the process's output buffers", md{"limit": "disk", "error": "ENOSPC"})
	}
	return internal("creating the process's output buffers failed")
}

// makeRoom evicts the oldest finished processes at the cap (ps.mu held).
func (ps *processes) makeRoom() error {
	limit := ps.s.cfg.MaxProcesses
	for len(ps.order) >= limit {
		victim := -1
		for i, p := range ps.order {
			if p.exited() {
				victim = i
				break
			}
		}
		if victim < 0 {
			return quotaExceeded(fmt.Sprintf("the container already has %d background processes running; end some first", len(ps.order)),
				strconv.Itoa(limit))
		}
		p := ps.order[victim]
		ps.order = append(ps.order[:victim], ps.order[victim+1:]...)
		delete(ps.byID, p.id)
		closeAll(p.files...) // whatever it left behind stops being read
		p.out.Remove()
		p.err.Remove()
	}
	return nil
}

// run copies the pipes into the rings and records the exit. EXITED is set
// once the process was reaped and its pipes are at EOF or stayed quiet for
// DrainIdle, so the rings then hold everything the process itself wrote.
func (p *process) run(c *child, cfg Config) {
	p.open.Store(2)
	p.lastOut.Store(time.Now().UnixNano())
	never := make(chan struct{}) // pipes are read to their end, not cut
	for _, pair := range []struct {
		f *os.File
		r *ring.Ring
	}{{c.stdout, p.out}, {c.stderr, p.err}} {
		go func() {
			pump(pair.f, never, 0, 0, func(b []byte) {
				_, _ = pair.r.Write(b) // a full disk loses output (recorded: readers see dropped_before), not the process
				p.lastOut.Store(time.Now().UnixNano())
			})
			p.open.Add(-1)
			_ = pair.f.Close()
		}()
	}
	go func() {
		oom := oomKills()
		ws := <-c.done
		exitAt := time.Now()
		// Quiet means nothing read for DrainIdle since the exit (not since
		// the last output before it: what the process wrote just before
		// exiting may not have been read yet).
		for p.open.Load() > 0 && time.Since(exitAt) < cfg.DrainMax &&
			time.Since(time.Unix(0, max(p.lastOut.Load(), exitAt.UnixNano()))) < cfg.DrainIdle {
			time.Sleep(quietPoll)
		}
		p.mu.Lock()
		p.exit, p.end = exitStatus(ws, false, oomKilled(ws, oom)), exitAt
		p.mu.Unlock()
		close(p.done)
	}()
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *process) proto(containerID string) *execv1.Process {
	outTotal, outFirst := p.out.State()
	errTotal, errFirst := p.err.State()
	pr := &execv1.Process{
		ProcessId: p.id, ContainerId: containerID, Command: p.command, Pid: int32(p.pid),
		State: execv1.ProcessState_PROCESS_STATE_RUNNING, StartTime: timestamppb.New(p.start),
		StdoutBytes: outTotal, StderrBytes: errTotal, StdoutFirstOffset: outFirst, StderrFirstOffset: errFirst,
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exit != nil {
		pr.State, pr.ExitStatus, pr.EndTime = execv1.ProcessState_PROCESS_STATE_EXITED, p.exit, timestamppb.New(p.end)
	}
	return pr
}

// GetProcess returns one background process.
func (s *Server) GetProcess(_ context.Context, req *execv1.GetProcessRequest) (*execv1.GetProcessResponse, error) {
	if err := s.checkContainer(req.ContainerId); err != nil {
		return nil, err
	}
	p, err := s.procs.get(req.ContainerId, req.ProcessId)
	if err != nil {
		return nil, err
	}
	return &execv1.GetProcessResponse{Process: p.proto(req.ContainerId)}, nil
}

// SignalProcess signals a background process's group (nothing once it was
// reaped: its pid may belong to another process by then).
func (s *Server) SignalProcess(_ context.Context, req *execv1.SignalProcessRequest) (*execv1.SignalProcessResponse, error) {
	if err := s.checkContainer(req.ContainerId); err != nil {
		return nil, err
	}
	sig, err := signalNumber(req.Signal, "signal")
	if err != nil {
		return nil, err
	}
	p, err := s.procs.get(req.ContainerId, req.ProcessId)
	if err != nil {
		return nil, err
	}
	// Only while it is not reaped (the reaper checks): after that its pid,
	// and so the group, may be another process's, even while its pipes are
	// still being drained.
	s.r.Kill(p.pid, sig, false)
	return &execv1.SignalProcessResponse{Process: p.proto(req.ContainerId)}, nil
}

// Page tokens name the state filter and the last process's start sequence.
func pageToken(state execv1.ProcessState, seq uint64) string {
	return base64.RawURLEncoding.EncodeToString(fmt.Appendf(nil, "p1:%d:%d", state, seq))
}

func parsePageToken(tok string, state execv1.ProcessState) (uint64, error) {
	bad := fail(codes.InvalidArgument, commonv1.ErrorReason_ERROR_REASON_INVALID_PAGE_TOKEN,
		"page_token is not a next_page_token of this listing", md{"field": "page_token"})
	if len(tok) > 64 {
		return 0, bad
	}
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return 0, bad
	}
	parts := strings.Split(string(raw), ":")
	if len(parts) != 3 || parts[0] != "p1" || parts[1] != strconv.Itoa(int(state)) {
		return 0, bad
	}
	seq, err := strconv.ParseUint(parts[2], 10, 64)
	if err != nil {
		return 0, bad
	}
	return seq, nil
}

// ListProcesses lists background processes, oldest first.
func (s *Server) ListProcesses(_ context.Context, req *execv1.ListProcessesRequest) (*execv1.ListProcessesResponse, error) {
	if err := s.checkContainer(req.ContainerId); err != nil {
		return nil, err
	}
	if _, ok := execv1.ProcessState_name[int32(req.State)]; !ok {
		return nil, invalidField("state", "is not a ProcessState")
	}
	size := int(req.PageSize)
	switch {
	case size < 0:
		return nil, invalidField("page_size", "must not be negative")
	case size == 0:
		size = defaultPageSize
	case size > maxPageSize:
		size = maxPageSize
	}
	var after uint64
	if req.PageToken != "" {
		var err error
		if after, err = parsePageToken(req.PageToken, req.State); err != nil {
			return nil, err
		}
	}
	s.procs.mu.Lock()
	order := append([]*process(nil), s.procs.order...)
	s.procs.mu.Unlock()
	resp := &execv1.ListProcessesResponse{}
	var last uint64
	bytes := 0
	for _, p := range order {
		if p.seq <= after {
			continue
		}
		pr := p.proto(req.ContainerId)
		if req.State != execv1.ProcessState_PROCESS_STATE_UNSPECIFIED && pr.State != req.State {
			continue
		}
		n := proto.Size(pr) + 8 // + the field's tag and length
		if len(resp.Processes) == size || (len(resp.Processes) > 0 && bytes+n > maxPageBytes) {
			resp.NextPageToken = pageToken(req.State, last)
			break
		}
		resp.Processes = append(resp.Processes, pr)
		bytes += n
		last = p.seq
	}
	return resp, nil
}

type attachStream = grpc.ServerStreamingServer[execv1.AttachProcessResponse]

// AttachProcess streams output from offsets, then follows it.
func (s *Server) AttachProcess(req *execv1.AttachProcessRequest, stream attachStream) error {
	if err := s.checkContainer(req.ContainerId); err != nil {
		return err
	}
	if req.StdoutOffset < 0 {
		return invalidField("stdout_offset", "must not be negative")
	}
	if req.StderrOffset < 0 {
		return invalidField("stderr_offset", "must not be negative")
	}
	p, err := s.procs.get(req.ContainerId, req.ProcessId)
	if err != nil {
		return err
	}
	ctx := stream.Context()
	offsets := [2]int64{req.StdoutOffset, req.StderrOffset}
	rings := [2]*ring.Ring{p.out, p.err}
	keep := time.NewTimer(s.cfg.Keepalive)
	defer keep.Stop()
	for {
		// Look at the exit before reading: output read after the exit was
		// seen is complete.
		exited := p.exited()
		changed := [2]<-chan struct{}{p.out.Changed(), p.err.Changed()}
		for i, r := range rings {
			for {
				at, data, dropped, err := r.Read(offsets[i], attachRead)
				if err != nil {
					return unavailable("the process's output buffer can no longer be read (evicted?)")
				}
				if len(data) == 0 {
					break
				}
				chunk := &execv1.OutputChunk{Offset: at, Data: data, DroppedBefore: dropped}
				msg := &execv1.AttachProcessResponse{Msg: &execv1.AttachProcessResponse_Stdout{Stdout: chunk}}
				if i == 1 {
					msg = &execv1.AttachProcessResponse{Msg: &execv1.AttachProcessResponse_Stderr{Stderr: chunk}}
				}
				if err := stream.Send(msg); err != nil {
					return err
				}
				offsets[i] = at + int64(len(data))
				keep.Reset(s.cfg.Keepalive)
			}
		}
		if exited {
			p.mu.Lock()
			st := p.exit
			p.mu.Unlock()
			return stream.Send(&execv1.AttachProcessResponse{Msg: &execv1.AttachProcessResponse_ExitStatus{ExitStatus: st}})
		}
		if !req.Follow {
			return nil
		}
		select {
		case <-changed[0]:
		case <-changed[1]:
		case <-p.done:
		case <-keep.C:
			if err := stream.Send(&execv1.AttachProcessResponse{Msg: &execv1.AttachProcessResponse_Keepalive{Keepalive: &execv1.Keepalive{}}}); err != nil {
				return err
			}
			keep.Reset(s.cfg.Keepalive)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

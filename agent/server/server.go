// Package server implements sandhub.exec.v1.ExecService inside a container.
package server

import (
	"os"
	"time"

	"github.com/sandhub/sandhub/agent/reaper"
	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
)

// Config is read once by main and passed down.
type Config struct {
	// Token is the per-container credential; calls prove they hold it
	// (auth.go), it never travels.
	Token []byte
	// ContainerID is the only container_id requests may name.
	ContainerID string
	// WorkDir resolves relative paths and is the default cwd (/work).
	WorkDir string
	// StateDir holds the background processes' output rings; inside the
	// container, so they count against its own disk or memory.
	StateDir string
	// Env is the base environment of every command (the container's), never
	// the agent's own secrets.
	Env []string
	// RingBytes is each background stream's buffer (1 MiB: a dev server's
	// recent log, and 64 processes cost at most 128 MiB).
	RingBytes int64
	// MaxProcesses caps background processes kept per container (finished
	// ones are evicted oldest first to make room).
	MaxProcesses int
	// Keepalive is sent on a stream idle this long (15 s, as the contract says).
	Keepalive time.Duration
	// DrainIdle: once a command exited, its output pipes are read until EOF
	// or until they stayed empty this long (a process it left behind holds
	// them open); nothing that was written is dropped by this wait.
	DrainIdle time.Duration
	// DrainMax bounds reading after the exit while something keeps writing;
	// past it the rest is cut and the caller told so.
	DrainMax time.Duration
}

// Defaults for the fields main does not set.
func (c Config) withDefaults() Config {
	if c.WorkDir == "" {
		c.WorkDir = "/work"
	}
	if c.StateDir == "" {
		c.StateDir = "/run/sandhub"
	}
	if c.RingBytes <= 0 {
		c.RingBytes = 1 << 20
	}
	if c.MaxProcesses <= 0 {
		c.MaxProcesses = 64
	}
	if c.Keepalive <= 0 {
		c.Keepalive = 15 * time.Second
	}
	if c.DrainIdle <= 0 {
		c.DrainIdle = time.Second
	}
	if c.DrainMax <= 0 {
		c.DrainMax = 10 * time.Second
	}
	return c
}

// Server serves ExecService.
type Server struct {
	execv1.UnimplementedExecServiceServer
	cfg   Config
	r     *reaper.Reaper
	procs *processes
}

// New makes a Server; r must be the process's only reaper.
func New(cfg Config, r *reaper.Reaper) (*Server, error) {
	cfg = cfg.withDefaults()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, r: r}
	s.procs = newProcesses(s)
	return s, nil
}

// Limits of the gRPC server: requests may be up to gRPC's default 4 MiB plus
// framing slack; a bounded number of concurrent streams per connection.
const (
	maxRecvBytes = 4<<20 + 64<<10
	maxSendBytes = 4<<20 + 64<<10
	maxStreams   = 256
)

// GRPCServer builds the grpc.Server with auth and bounds, ExecService registered
// (every method as a stream: unary.go).
func (s *Server) GRPCServer() *grpc.Server {
	g := grpc.NewServer(
		grpc.MaxRecvMsgSize(maxRecvBytes),
		grpc.MaxSendMsgSize(maxSendBytes),
		grpc.MaxConcurrentStreams(maxStreams),
		grpc.UnaryInterceptor(s.UnaryAuth),
		grpc.StreamInterceptor(s.StreamAuth),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.MaxHeaderListSize(64<<10),
		grpc.ConnectionTimeout(10*time.Second),
	)
	g.RegisterService(streamedServiceDesc(), s)
	// Open without credentials (auth.go), for a kubelet's gRPC readiness
	// probe; it says only that the agent serves.
	healthpb.RegisterHealthServer(g, health.NewServer())
	return g
}

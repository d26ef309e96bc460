package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sandhub/sandhub/agent/reaper"
	commonv1 "github.com/sandhub/sandhub/gen/go/sandhub/common/v1"
	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	testToken     = "test-token-0123456789abcdef"
	testContainer = "c-test"
)

// One reaper per process: it waits for any child.
var (
	reaperOnce sync.Once
	theReaper  *reaper.Reaper
)

type agent struct {
	client execv1.ExecServiceClient
	cfg    Config
	conn   *grpc.ClientConn
}

// newAgent starts a real gRPC server on a unix socket in t.TempDir().
func newAgent(t testing.TB, tweak ...func(*Config)) *agent {
	t.Helper()
	reaperOnce.Do(func() { theReaper = reaper.New() })
	dir := t.TempDir()
	cfg := Config{
		Token: []byte(testToken), ContainerID: testContainer,
		WorkDir: filepath.Join(dir, "work"), StateDir: filepath.Join(dir, "state"),
		Env:       []string{"PATH=/usr/local/bin:/usr/bin:/bin", "BASE=base"},
		DrainIdle: 200 * time.Millisecond, DrainMax: 2 * time.Second,
	}
	for _, f := range tweak {
		f(&cfg)
	}
	srv, err := New(cfg, theReaper)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "agent.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := srv.GRPCServer()
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8<<20)),
		grpc.WithUnaryInterceptor(signUnary), grpc.WithStreamInterceptor(signStream))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &agent{client: execv1.NewExecServiceClient(conn), cfg: srv.cfg, conn: conn}
}

// ctx's calls prove the test token (the client interceptors sign each call
// for its method, as the Hub does), within a bound on the whole test call.
func authed(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return withToken(ctx, testToken)
}

type tokenKey struct{}
type nonceKey struct{}

// withToken: ctx's calls are signed with token (a wrong one in auth tests).
func withToken(ctx context.Context, token string) context.Context {
	return context.WithValue(ctx, tokenKey{}, token)
}

// withNonce: ctx's calls use this nonce instead of a random one.
func withNonce(ctx context.Context, nonce string) context.Context {
	return context.WithValue(ctx, nonceKey{}, nonce)
}

// sign adds the nonce and the auth header for method, when ctx has a token.
func sign(ctx context.Context, method string) context.Context {
	tok, ok := ctx.Value(tokenKey{}).(string)
	if !ok {
		return ctx
	}
	nonce, ok := ctx.Value(nonceKey{}).(string)
	if !ok {
		b := make([]byte, 16)
		_, _ = rand.Read(b)
		nonce = hex.EncodeToString(b)
	}
	return metadata.AppendToOutgoingContext(ctx, NonceHeader, nonce, AuthHeader, CallAuth([]byte(tok), nonce, method))
}

func signUnary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, inv grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	return inv(sign(ctx, method), method, req, reply, cc, opts...)
}

func signStream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, str grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return str(sign(ctx, method), desc, cc, method, opts...)
}

// wantErr checks code, reason (ErrorInfo and ErrorDetail) and metadata.
func wantErr(t *testing.T, err error, code codes.Code, reason string, meta map[string]string) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok || st.Code() != code {
		t.Fatalf("got %v, want code %v", err, code)
	}
	var info *errdetails.ErrorInfo
	var detail *commonv1.ErrorDetail
	var bad *errdetails.BadRequest
	for _, d := range st.Details() {
		switch v := d.(type) {
		case *errdetails.ErrorInfo:
			info = v
		case *commonv1.ErrorDetail:
			detail = v
		case *errdetails.BadRequest:
			bad = v
		}
	}
	if info == nil || detail == nil {
		t.Fatalf("%v: missing ErrorInfo or ErrorDetail in %v", err, st.Details())
	}
	if info.Domain != "sandhub.dev" || info.Reason != reason || detail.Reason.String() != "ERROR_REASON_"+reason {
		t.Fatalf("%v: got domain %q reason %q / %v, want %q", err, info.Domain, info.Reason, detail.Reason, reason)
	}
	for k, v := range meta {
		if got, ok := info.Metadata[k]; !ok || (v != "*" && got != v) {
			t.Fatalf("%v: metadata %q = %q, want %q (all: %v)", err, k, got, v, info.Metadata)
		}
	}
	allowed := map[string]bool{"field": true, "container_id": true, "process_id": true, "path": true,
		"state": true, "limit": true, "retry_after_s": true, "error": true}
	for k := range info.Metadata {
		if !allowed[k] {
			t.Fatalf("metadata key %q is not in errors.proto's set", k)
		}
	}
	if f, ok := info.Metadata["field"]; ok {
		if bad == nil || len(bad.FieldViolations) != 1 || bad.FieldViolations[0].Field != f {
			t.Fatalf("field %q without a matching BadRequest: %v", f, bad)
		}
	}
}

func sh(script string) *execv1.Command { return &execv1.Command{Shell: script} }

package server

import (
	"context"
	"strings"
	"testing"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

const (
	testNonce = "0123456789abcdef0123456789abcdef"
	// testProof is sandhub.internal_auth.agent_proof(testToken, testNonce),
	// computed by the Python side: both halves must agree.
	testProof = "1d74a1615bd07998a90af5b60ecd65a2a12a5c03a9fe93c0ee4c1ec90fb06407"
)

func withNonce(ctx context.Context, nonce string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, NonceHeader, nonce)
}

func proofOf(md metadata.MD) string {
	if v := md.Get(ProofHeader); len(v) == 1 {
		return v[0]
	}
	return strings.Join(md.Get(ProofHeader), ",")
}

func TestProofMatchesThePythonSide(t *testing.T) {
	if got := Proof([]byte(testToken), testNonce); got != testProof {
		t.Fatalf("Proof = %s, want %s", got, testProof)
	}
}

// A unary call's proof arrives with its response headers, for a call that
// succeeds and for one that then fails.
func TestUnaryCallsAnswerTheNonce(t *testing.T) {
	a := newAgent(t)
	var hdr metadata.MD
	ctx := withNonce(authed(t), testNonce)
	if _, err := a.client.Run(ctx, &execv1.RunRequest{ContainerId: testContainer, Command: sh("true")}, grpc.Header(&hdr)); err != nil {
		t.Fatal(err)
	}
	if proofOf(hdr) != testProof {
		t.Fatalf("proof on success: %v", hdr)
	}
	hdr = nil
	_, err := a.client.Run(ctx, &execv1.RunRequest{ContainerId: "c-other", Command: sh("true")}, grpc.Header(&hdr))
	wantErr(t, err, codes.NotFound, "CONTAINER_NOT_FOUND", map[string]string{"container_id": "c-other"})
	if proofOf(hdr) != testProof {
		t.Fatalf("proof before an error: %v", hdr)
	}
}

// A stream's proof is sent as soon as the call starts: the caller reads it
// before it has sent a single request message.
func TestStreamsAnswerTheNonceBeforeAnyMessage(t *testing.T) {
	a := newAgent(t)
	ctx, cancel := context.WithCancel(withNonce(authed(t), testNonce))
	defer cancel()
	s, err := a.client.Exec(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hdr, err := s.Header()
	if err != nil {
		t.Fatal(err)
	}
	if proofOf(hdr) != testProof {
		t.Fatalf("stream proof: %v", hdr)
	}
	up, err := a.client.PutFiles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if hdr, err = up.Header(); err != nil || proofOf(hdr) != testProof {
		t.Fatalf("PutFiles proof: %v %v", hdr, err)
	}
}

// A wrong token never gets a proof; an unusable nonce gets none either.
func TestNoProofForAWrongTokenOrAnOverlongNonce(t *testing.T) {
	a := newAgent(t)
	req := &execv1.RunRequest{ContainerId: testContainer, Command: sh("true")}
	bad := withNonce(metadata.AppendToOutgoingContext(context.Background(), TokenHeader, testToken+"x"), testNonce)
	var hdr metadata.MD
	_, err := a.client.Run(bad, req, grpc.Header(&hdr))
	wantErr(t, err, codes.Unauthenticated, "INVALID_CREDENTIALS", nil)
	if len(hdr.Get(ProofHeader)) != 0 {
		t.Fatalf("a wrong token got a proof: %v", hdr)
	}
	s, err := a.client.Exec(bad)
	if err != nil {
		t.Fatal(err)
	}
	if hdr, _ = s.Header(); len(hdr.Get(ProofHeader)) != 0 {
		t.Fatalf("a wrong token got a stream proof: %v", hdr)
	}
	_, err = s.Recv()
	wantErr(t, err, codes.Unauthenticated, "INVALID_CREDENTIALS", nil)

	hdr = nil
	long := withNonce(authed(t), strings.Repeat("a", maxNonce+1))
	if _, err := a.client.Run(long, req, grpc.Header(&hdr)); err != nil {
		t.Fatal(err)
	}
	if len(hdr.Get(ProofHeader)) != 0 {
		t.Fatalf("an overlong nonce got a proof: %v", hdr)
	}
	hdr = nil
	edge := strings.Repeat("b", maxNonce)
	if _, err := a.client.Run(withNonce(authed(t), edge), req, grpc.Header(&hdr)); err != nil {
		t.Fatal(err)
	}
	if proofOf(hdr) != Proof([]byte(testToken), edge) {
		t.Fatalf("a %d-character nonce: %v", maxNonce, hdr)
	}
}

// Health checking is open (a kubelet's gRPC probe sends no metadata); it
// answers SERVING and nothing else.
func TestHealthNeedsNoToken(t *testing.T) {
	a := newAgent(t)
	resp, err := healthpb.NewHealthClient(a.conn).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("%v %v", resp, err)
	}
}

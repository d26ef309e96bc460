package server

import (
	"context"
	"strings"
	"testing"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

const (
	testNonce = "0123456789abcdef0123456789abcdef"
	// testProof is hex HMAC-SHA256(testToken, testNonce) and testRunAuth the
	// auth header of a Run call with testNonce, computed by the Python side's
	// formula: both halves must agree.
	testProof   = "1d74a1615bd07998a90af5b60ecd65a2a12a5c03a9fe93c0ee4c1ec90fb06407"
	testRunAuth = "87ad6d591e471d2109a3a46f4568c8ca17e1ad20f16e03564f64cf65410a41a8"
	runMethod   = "/sandhub.exec.v1.ExecService/Run"
)

func TestAuthAndProofMatchThePythonSide(t *testing.T) {
	if got := Proof([]byte(testToken), testNonce); got != testProof {
		t.Fatalf("Proof = %s, want %s", got, testProof)
	}
	if got := CallAuth([]byte(testToken), testNonce, runMethod); got != testRunAuth {
		t.Fatalf("CallAuth = %s, want %s", got, testRunAuth)
	}
}

// raw is a context carrying exactly these metadata pairs (no signing).
func raw(kv ...string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), kv...)
}

func proofOf(md metadata.MD) string {
	return strings.Join(md.Get(ProofHeader), ",")
}

// Missing or wrong credentials are UNAUTHENTICATED with no proof, for unary
// methods and streams alike, and the credential itself is never accepted in
// clear (the old x-sandhub-agent-token header is gone).
func TestAuthMissingWrongAndReplayed(t *testing.T) {
	a := newAgent(t)
	req := &execv1.RunRequest{ContainerId: testContainer, Command: sh("true")}
	cases := []struct {
		name   string
		ctx    context.Context
		reason string
	}{
		{"nothing", context.Background(), "MISSING_CREDENTIALS"},
		{"the token in clear", raw("x-sandhub-agent-token", testToken), "MISSING_CREDENTIALS"},
		{"nonce only", raw(NonceHeader, testNonce), "MISSING_CREDENTIALS"},
		{"auth only", raw(AuthHeader, testRunAuth), "MISSING_CREDENTIALS"},
		{"wrong token", withToken(context.Background(), testToken+"x"), "INVALID_CREDENTIALS"},
		{"the token as auth", raw(NonceHeader, testNonce, AuthHeader, testToken), "INVALID_CREDENTIALS"},
		{"the proof as auth", raw(NonceHeader, testNonce, AuthHeader, testProof), "INVALID_CREDENTIALS"},
		{"another nonce's auth", raw(NonceHeader, testNonce+"0", AuthHeader, testRunAuth), "INVALID_CREDENTIALS"},
		{"upper-case hex", raw(NonceHeader, testNonce, AuthHeader, strings.ToUpper(testRunAuth)), "INVALID_CREDENTIALS"},
		{"two nonces", raw(NonceHeader, testNonce, NonceHeader, testNonce, AuthHeader, testRunAuth), "MISSING_CREDENTIALS"},
		{"overlong nonce", withNonce(withToken(context.Background(), testToken), strings.Repeat("a", maxNonce+1)), "INVALID_CREDENTIALS"},
	}
	for _, c := range cases {
		var hdr metadata.MD
		_, err := a.client.Run(c.ctx, req, grpc.Header(&hdr))
		wantErr(t, err, codes.Unauthenticated, c.reason, nil)
		if len(hdr.Get(ProofHeader)) != 0 {
			t.Fatalf("%s: got a proof: %v", c.name, hdr)
		}
	}
	// A Run's auth header does not open another method with the same nonce.
	_, err := a.client.GetProcess(raw(NonceHeader, testNonce, AuthHeader, testRunAuth),
		&execv1.GetProcessRequest{ContainerId: testContainer, ProcessId: "p"})
	wantErr(t, err, codes.Unauthenticated, "INVALID_CREDENTIALS", nil)
	// Streams are checked too, before their first message is read.
	s, err := a.client.Exec(withToken(context.Background(), testToken+"x"))
	if err != nil {
		t.Fatal(err)
	}
	if hdr, _ := s.Header(); len(hdr.Get(ProofHeader)) != 0 {
		t.Fatalf("a wrong token got a stream proof: %v", hdr)
	}
	_, err = s.Recv()
	wantErr(t, err, codes.Unauthenticated, "INVALID_CREDENTIALS", nil)
	// The right one, exactly as the Python side computes it, works.
	if _, err := a.client.Run(raw(NonceHeader, testNonce, AuthHeader, testRunAuth), req); err != nil {
		t.Fatal(err)
	}
	edge := withNonce(authed(t), strings.Repeat("b", maxNonce))
	var hdr metadata.MD
	if _, err := a.client.Run(edge, req, grpc.Header(&hdr)); err != nil || proofOf(hdr) != Proof([]byte(testToken), strings.Repeat("b", maxNonce)) {
		t.Fatalf("a %d-character nonce: %v %v", maxNonce, hdr, err)
	}
}

func TestOtherContainerIsNotFound(t *testing.T) {
	a := newAgent(t)
	ctx := authed(t)
	_, err := a.client.Run(ctx, &execv1.RunRequest{ContainerId: "c-other", Command: sh("true")})
	wantErr(t, err, codes.NotFound, "CONTAINER_NOT_FOUND", map[string]string{"container_id": "c-other"})
	_, err = a.client.GetProcess(ctx, &execv1.GetProcessRequest{ContainerId: "", ProcessId: "p"})
	wantErr(t, err, codes.NotFound, "CONTAINER_NOT_FOUND", map[string]string{"container_id": ""})
}

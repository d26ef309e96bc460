package server

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strings"

	commonv1 "github.com/sandhub/sandhub/gen/go/sandhub/common/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

// Metadata of the per-container credential scheme (the contract is in
// proto/sandhub/internal/v1/agents.proto, AgentDirectoryService's comment).
// The credential itself never travels: whoever listens at the agent's address
// (an address reused by another container, a tenant's process that took the
// port) learns nothing it could replay against another container.
const (
	// NonceHeader is the caller's fresh challenge, at most maxNonce characters.
	NonceHeader = "x-sandhub-agent-nonce"
	// AuthHeader proves the caller holds the credential: hex
	// HMAC-SHA256(token, "hub\x00" + nonce + "\x00" + full method name).
	AuthHeader = "x-sandhub-agent-auth"
	// ProofHeader is the agent's answer, sent before it reads any request
	// message: hex HMAC-SHA256(token, nonce). The Hub relays nothing before it
	// has checked it, so an address reused by another container's agent gets
	// no data.
	ProofHeader = "x-sandhub-agent-proof"
	// maxNonce bounds what is hashed; the Hub sends 32 hex characters.
	maxNonce = 64
	// openPrefix: gRPC health checking needs no credential (probes send none).
	openPrefix = "/grpc.health.v1.Health/"
)

// authenticate checks the call's nonce and auth headers and returns the
// proof to answer with. A caller without the credential never gets a proof.
func (s *Server) authenticate(ctx context.Context, method string) (metadata.MD, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	nonce, auth := md.Get(NonceHeader), md.Get(AuthHeader)
	if len(nonce) != 1 || nonce[0] == "" || len(auth) != 1 || auth[0] == "" {
		return nil, fail(codes.Unauthenticated, commonv1.ErrorReason_ERROR_REASON_MISSING_CREDENTIALS,
			"missing "+NonceHeader+" or "+AuthHeader+" metadata", nil)
	}
	want := CallAuth(s.cfg.Token, nonce[0], method)
	// hmac.Equal compares in constant time (a length difference is not secret).
	if len(nonce[0]) > maxNonce || !hmac.Equal([]byte(auth[0]), []byte(want)) {
		return nil, fail(codes.Unauthenticated, commonv1.ErrorReason_ERROR_REASON_INVALID_CREDENTIALS,
			"wrong "+AuthHeader+" (or a "+NonceHeader+" longer than 64 characters)", nil)
	}
	return metadata.Pairs(ProofHeader, Proof(s.cfg.Token, nonce[0])), nil
}

// CallAuth is what the Hub sends as AuthHeader for one call: bound to the
// nonce and to the method, so a captured value opens nothing else.
func CallAuth(token []byte, nonce, method string) string {
	return hexHMAC(token, "hub\x00"+nonce+"\x00"+method)
}

// Proof is the agent's answer to nonce: hex HMAC-SHA256(token, nonce).
func Proof(token []byte, nonce string) string {
	return hexHMAC(token, nonce)
}

func hexHMAC(key []byte, msg string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(msg))
	return hex.EncodeToString(m.Sum(nil))
}

// StreamAuth checks the credential before any handler runs and sends the
// proof at once, before any request message is read: every ExecService
// method is served as a stream (unary.go) so that this holds for Run and the
// other unary methods too, and the caller can check the proof before it
// sends a payload.
func (s *Server) StreamAuth(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if strings.HasPrefix(info.FullMethod, openPrefix) {
		return h(srv, ss)
	}
	proof, err := s.authenticate(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	if err := ss.SendHeader(proof); err != nil {
		return err // the caller went away
	}
	return h(srv, ss)
}

// UnaryAuth: the only unary handlers left are the open health checks; any
// other unary method is checked like a stream (its proof then goes with the
// response headers).
func (s *Server) UnaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if strings.HasPrefix(info.FullMethod, openPrefix) {
		return h(ctx, req)
	}
	proof, err := s.authenticate(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	if err := grpc.SetHeader(ctx, proof); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

// checkContainer accepts only this agent's own container id.
func (s *Server) checkContainer(id string) error {
	if id != s.cfg.ContainerID {
		return fail(codes.NotFound, commonv1.ErrorReason_ERROR_REASON_CONTAINER_NOT_FOUND,
			"no such container: "+id, md{"container_id": id})
	}
	return nil
}

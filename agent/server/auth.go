package server

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"strings"

	commonv1 "github.com/sandhub/sandhub/gen/go/sandhub/common/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

// Metadata of the per-container credential scheme (the contract is in
// proto/sandhub/internal/v1/agents.proto, AgentDirectoryService's comment).
const (
	// TokenHeader is the metadata key every call must carry.
	TokenHeader = "x-sandhub-agent-token"
	// NonceHeader is the caller's fresh challenge.
	NonceHeader = "x-sandhub-agent-nonce"
	// ProofHeader is the response header answering it: hex
	// HMAC-SHA256(token, nonce). The Hub relays nothing before it has it, so
	// an address reused by another container's agent gets no data.
	ProofHeader = "x-sandhub-agent-proof"
	// maxNonce bounds what is hashed; the Hub sends 32 hex characters.
	maxNonce = 64
	// openPrefix: gRPC health checking needs no token (probes send none).
	openPrefix = "/grpc.health.v1.Health/"
)

func (s *Server) authenticate(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	got := md.Get(TokenHeader)
	if len(got) != 1 || got[0] == "" {
		return fail(codes.Unauthenticated, commonv1.ErrorReason_ERROR_REASON_MISSING_CREDENTIALS,
			"missing "+TokenHeader+" metadata", nil)
	}
	if subtle.ConstantTimeCompare([]byte(got[0]), s.cfg.Token) != 1 {
		return fail(codes.Unauthenticated, commonv1.ErrorReason_ERROR_REASON_INVALID_CREDENTIALS,
			"wrong "+TokenHeader, nil)
	}
	return nil
}

// proof is the response header answering the call's nonce, or nil when it
// sent none usable (none, several, or longer than maxNonce: then the caller
// gets no proof and must not trust the answer). Only called once the token
// was right: a wrong token never learns a proof.
func (s *Server) proof(ctx context.Context) metadata.MD {
	md, _ := metadata.FromIncomingContext(ctx)
	nonce := md.Get(NonceHeader)
	if len(nonce) != 1 || nonce[0] == "" || len(nonce[0]) > maxNonce {
		return nil
	}
	return metadata.Pairs(ProofHeader, Proof(s.cfg.Token, nonce[0]))
}

// Proof is hex HMAC-SHA256(token, nonce).
func Proof(token []byte, nonce string) string {
	m := hmac.New(sha256.New, token)
	m.Write([]byte(nonce))
	return hex.EncodeToString(m.Sum(nil))
}

// UnaryAuth and StreamAuth check the token before any handler runs, and
// answer the nonce right after: a unary call's proof goes out with its
// response headers (also ahead of an error status); a stream's is sent at
// once, before any request message is read, so the caller can check it
// before it sends a payload.
func (s *Server) UnaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if strings.HasPrefix(info.FullMethod, openPrefix) {
		return h(ctx, req)
	}
	if err := s.authenticate(ctx); err != nil {
		return nil, err
	}
	if p := s.proof(ctx); p != nil {
		if err := grpc.SetHeader(ctx, p); err != nil {
			return nil, err
		}
	}
	return h(ctx, req)
}

func (s *Server) StreamAuth(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if strings.HasPrefix(info.FullMethod, openPrefix) {
		return h(srv, ss)
	}
	if err := s.authenticate(ss.Context()); err != nil {
		return err
	}
	if p := s.proof(ss.Context()); p != nil {
		if err := ss.SendHeader(p); err != nil {
			return err // the caller went away
		}
	}
	return h(srv, ss)
}

// checkContainer accepts only this agent's own container id.
func (s *Server) checkContainer(id string) error {
	if id != s.cfg.ContainerID {
		return fail(codes.NotFound, commonv1.ErrorReason_ERROR_REASON_CONTAINER_NOT_FOUND,
			"no such container: "+id, md{"container_id": id})
	}
	return nil
}

package server

import (
	"context"
	"crypto/subtle"

	commonv1 "github.com/sandhub/sandhub/gen/go/sandhub/common/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

// TokenHeader is the metadata key every call must carry.
const TokenHeader = "x-sandhub-agent-token"

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

// UnaryAuth and StreamAuth check the token before any handler runs.
func (s *Server) UnaryAuth(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := s.authenticate(ctx); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func (s *Server) StreamAuth(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := s.authenticate(ss.Context()); err != nil {
		return err
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

package server

import (
	"context"
	"testing"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

func TestAuthMissingAndWrongToken(t *testing.T) {
	a := newAgent(t)
	req := &execv1.RunRequest{ContainerId: testContainer, Command: sh("true")}
	_, err := a.client.Run(context.Background(), req)
	wantErr(t, err, codes.Unauthenticated, "MISSING_CREDENTIALS", nil)
	bad := metadata.AppendToOutgoingContext(context.Background(), TokenHeader, testToken+"x")
	_, err = a.client.Run(bad, req)
	wantErr(t, err, codes.Unauthenticated, "INVALID_CREDENTIALS", nil)
	// Streams are checked too, before their first message is read.
	s, err := a.client.Exec(bad)
	if err == nil {
		_, err = s.Recv()
	}
	wantErr(t, err, codes.Unauthenticated, "INVALID_CREDENTIALS", nil)
	if _, err := a.client.Run(authed(t), req); err != nil {
		t.Fatal(err)
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

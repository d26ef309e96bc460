package server

import (
	"context"
	"testing"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// Every method, unary ones included, sends its proof before it reads the
// request: a caller holding the call open without sending anything gets the
// header. (A unary stub cannot do that, so the unary methods are opened here
// as the Hub's relay opens them: a stream that sends after the proof.)
func TestEveryMethodAnswersTheNonceBeforeTheRequest(t *testing.T) {
	a := newAgent(t)
	methods := map[string]proto.Message{
		"Run":           &execv1.RunRequest{ContainerId: testContainer, Command: sh("echo hi")},
		"StartProcess":  &execv1.StartProcessRequest{ContainerId: "c-other"},
		"GetProcess":    &execv1.GetProcessRequest{ContainerId: "c-other"},
		"ListProcesses": &execv1.ListProcessesRequest{ContainerId: testContainer},
		"SignalProcess": &execv1.SignalProcessRequest{ContainerId: "c-other"},
		"PutFiles":      nil, "GetFiles": nil, "Exec": nil, "AttachProcess": nil,
	}
	for name, req := range methods {
		method := "/sandhub.exec.v1.ExecService/" + name
		ctx, cancel := context.WithTimeout(withNonce(authed(t), testNonce), time.Minute)
		desc := &grpc.StreamDesc{StreamName: name, ServerStreams: true, ClientStreams: true}
		s, err := a.conn.NewStream(ctx, desc, method)
		if err != nil {
			t.Fatal(name, err)
		}
		hdr, err := s.Header() // nothing was sent yet
		if err != nil || proofOf(hdr) != testProof {
			t.Fatalf("%s: proof before the request: %v %v", name, hdr, err)
		}
		if req != nil { // and then the call goes on as usual
			if err := s.SendMsg(req); err != nil {
				t.Fatal(name, err)
			}
			_ = s.CloseSend()
			resp := &execv1.RunResponse{}
			err := s.RecvMsg(resp)
			if name == "Run" && (err != nil || string(resp.Stdout) != "hi\n") {
				t.Fatalf("Run after the proof: %v %v", resp, err)
			}
		}
		cancel()
	}
}

// Unary stubs still work (the wire is the same): the proof comes with the
// response headers, also ahead of an error status; the request reaching its
// end before the request message is INVALID_ARGUMENT.
func TestUnaryStubsStillWork(t *testing.T) {
	a := newAgent(t)
	var hdr metadata.MD
	ctx := withNonce(authed(t), testNonce)
	resp, err := a.client.Run(ctx, &execv1.RunRequest{ContainerId: testContainer, Command: sh("echo ok")}, grpc.Header(&hdr))
	if err != nil || string(resp.Stdout) != "ok\n" {
		t.Fatal(resp, err)
	}
	if proofOf(hdr) != testProof {
		t.Fatalf("proof on success: %v", hdr)
	}
	hdr = nil
	_, err = a.client.Run(ctx, &execv1.RunRequest{ContainerId: "c-other", Command: sh("true")}, grpc.Header(&hdr))
	wantErr(t, err, codes.NotFound, "CONTAINER_NOT_FOUND", map[string]string{"container_id": "c-other"})
	if proofOf(hdr) != testProof {
		t.Fatalf("proof before an error: %v", hdr)
	}
	if _, err := a.client.ListProcesses(ctx, &execv1.ListProcessesRequest{ContainerId: testContainer}); err != nil {
		t.Fatal(err)
	}
	s, err := a.conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, runMethod)
	if err != nil {
		t.Fatal(err)
	}
	_ = s.CloseSend()
	wantErr(t, s.RecvMsg(&execv1.RunResponse{}), codes.InvalidArgument, "INVALID_STREAM", nil)
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

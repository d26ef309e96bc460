package server

import (
	"errors"
	"io"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc"
)

// streamedServiceDesc is ExecService with each unary method served by a
// stream handler. The wire is the same (one request message, one response
// message), so unary stubs work unchanged; what changes is that the stream
// interceptor runs before the request is read, so the agent's proof header
// (auth.go) goes out before the caller sends its request: the Hub waits for
// it and relays no payload to an agent that could not answer.
func streamedServiceDesc() *grpc.ServiceDesc {
	sd := execv1.ExecService_ServiceDesc
	sd.Streams = append([]grpc.StreamDesc(nil), sd.Streams...)
	for _, m := range sd.Methods {
		// ClientStreams: grpc-go skips the stream interceptor for a
		// StreamDesc that streams neither way (it takes it for unary).
		sd.Streams = append(sd.Streams, grpc.StreamDesc{
			StreamName: m.MethodName, Handler: unaryOverStream(m.Handler), ClientStreams: true,
		})
	}
	sd.Methods = nil
	return &sd
}

// unaryOverStream runs a generated unary handler on a stream: read the one
// request, call the implementation, send the one response. Without an
// interceptor the generated handler calls the method directly.
func unaryOverStream(h grpc.MethodHandler) grpc.StreamHandler {
	return func(srv any, ss grpc.ServerStream) error {
		resp, err := h(srv, ss.Context(), func(req any) error {
			err := ss.RecvMsg(req)
			if errors.Is(err, io.EOF) {
				return invalidStream("the call ended before its request message")
			}
			return err
		}, nil)
		if err != nil {
			return err
		}
		return ss.SendMsg(resp)
	}
}

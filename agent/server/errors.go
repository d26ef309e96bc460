package server

import (
	"strings"

	commonv1 "github.com/sandhub/sandhub/gen/go/sandhub/common/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Domain of every ErrorInfo, as errors.proto says.
const errorDomain = "sandhub.dev"

// md is ErrorInfo metadata; keys only from errors.proto's documented set
// (field, container_id, process_id, path, limit, error).
type md map[string]string

// fail builds a status carrying ErrorInfo + ErrorDetail (+ BadRequest when
// there is a "field"), exactly the shape errors.proto describes.
func fail(code codes.Code, reason commonv1.ErrorReason, msg string, meta md) error {
	st := status.New(code, msg)
	info := &errdetails.ErrorInfo{
		Domain:   errorDomain,
		Reason:   strings.TrimPrefix(reason.String(), "ERROR_REASON_"),
		Metadata: meta,
	}
	var err error
	if field, ok := meta["field"]; ok {
		bad := &errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: field, Description: msg},
		}}
		st, err = st.WithDetails(info, &commonv1.ErrorDetail{Reason: reason}, bad)
	} else {
		st, err = st.WithDetails(info, &commonv1.ErrorDetail{Reason: reason})
	}
	if err != nil {
		return status.Error(codes.Internal, "building the error status failed")
	}
	return st.Err()
}

func invalidField(field, msg string) error {
	return fail(codes.InvalidArgument, commonv1.ErrorReason_ERROR_REASON_INVALID_FIELD, field+": "+msg, md{"field": field})
}

func invalidStream(msg string) error {
	return fail(codes.InvalidArgument, commonv1.ErrorReason_ERROR_REASON_INVALID_STREAM, msg, nil)
}

func pathNotAllowed(path, msg string) error {
	return fail(codes.InvalidArgument, commonv1.ErrorReason_ERROR_REASON_PATH_NOT_ALLOWED, msg, md{"path": path})
}

func pathNotFound(path string) error {
	return fail(codes.NotFound, commonv1.ErrorReason_ERROR_REASON_PATH_NOT_FOUND,
		"no such file or directory in the container: "+path, md{"path": path})
}

func payloadTooLarge(msg, limit string) error {
	return fail(codes.ResourceExhausted, commonv1.ErrorReason_ERROR_REASON_PAYLOAD_TOO_LARGE, msg, md{"limit": limit})
}

func quotaExceeded(msg, limit string) error {
	return fail(codes.ResourceExhausted, commonv1.ErrorReason_ERROR_REASON_QUOTA_EXCEEDED, msg, md{"limit": limit})
}

func unavailable(msg string) error {
	return fail(codes.Unavailable, commonv1.ErrorReason_ERROR_REASON_BACKEND_UNAVAILABLE, msg, nil)
}

func internal(msg string) error {
	return fail(codes.Internal, commonv1.ErrorReason_ERROR_REASON_INTERNAL, msg, nil)
}

func timeoutErr(msg string) error {
	return fail(codes.DeadlineExceeded, commonv1.ErrorReason_ERROR_REASON_TIMEOUT, msg, nil)
}

// statusOf tells whether err already is a gRPC status (ours).
func statusOf(err error) (*status.Status, bool) {
	return status.FromError(err)
}

package main

import (
	"fmt"
	"regexp"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	commonv1 "github.com/sandhub/sandhub/gen/go/sandhub/common/v1"
)

// statusFields is what a caller reads from a sandhub error: the code, and the
// details of the standard grpc-status-details-bin trailer, which
// status.Details() decodes because errdetails and commonv1 are linked in
// (their types are in the global registry).
func statusFields(err error, trailer metadata.MD) fields {
	st, _ := status.FromError(err)
	saw := fields{"code": codeName(st.Code().String()), "message": st.Message()}
	if ids := trailer.Get("x-request-id"); len(ids) > 0 {
		saw["request_id"] = ids[0]
	}
	var unknown []string
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			saw["error_info"] = fields{"domain": d.GetDomain(), "reason": d.GetReason(), "metadata": d.GetMetadata()}
		case *commonv1.ErrorDetail:
			saw["error_detail"] = d.GetReason().String()
		case *errdetails.BadRequest:
			var violations []fields
			for _, v := range d.GetFieldViolations() {
				violations = append(violations, fields{"field": v.GetField(), "description": v.GetDescription()})
			}
			saw["bad_request"] = violations
		case error: // a detail whose type is not linked in
			unknown = append(unknown, d.Error())
		default:
			unknown = append(unknown, fmt.Sprintf("%T", d))
		}
	}
	if unknown != nil {
		saw["other_details"] = unknown
	}
	return saw
}

// codeName turns grpc-go's "NotFound" into the canonical "NOT_FOUND", as
// every other language and the docs spell it.
func codeName(s string) string {
	return strings.ToUpper(camelBoundary.ReplaceAllString(s, "${1}_${2}"))
}

var camelBoundary = regexp.MustCompile(`([a-z])([A-Z])`)

// expectError checks a status against the contract: its code, the
// ErrorInfo's domain and reason, the ErrorDetail's enum, and the metadata.
func expectError(saw fields, code, reason string, md map[string]string) error {
	if saw["code"] != code {
		return fmt.Errorf("code %v, want %s", saw["code"], code)
	}
	info, _ := saw["error_info"].(fields)
	if info == nil {
		return fmt.Errorf("no google.rpc.ErrorInfo in the status details")
	}
	if info["domain"] != "sandhub.dev" || info["reason"] != reason {
		return fmt.Errorf("ErrorInfo %v/%v, want sandhub.dev/%s", info["domain"], info["reason"], reason)
	}
	got, _ := info["metadata"].(map[string]string)
	for k, v := range md {
		if got[k] != v {
			return fmt.Errorf("ErrorInfo.metadata[%q] = %q, want %q", k, got[k], v)
		}
	}
	if want := "ERROR_REASON_" + reason; saw["error_detail"] != want {
		return fmt.Errorf("sandhub.common.v1.ErrorDetail %v, want %s", saw["error_detail"], want)
	}
	if saw["request_id"] == nil {
		return fmt.Errorf("no x-request-id in the trailers")
	}
	return nil
}

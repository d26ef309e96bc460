// Command interop walks sandhub's public API as a Go caller would: grpc-go,
// the stubs under gen/go, TLS, and the API key as standard per-call
// credentials (oauth.TokenSource, which refuses to send it without TLS).
//
// It prints one JSON line per step with what it saw, and exits 1 when any
// step saw something other than the contract promises (tests/interop's
// pytest runs it against a real Hub and reads the lines).
//
//	SANDHUB_API_KEY=key-a interop -hub 127.0.0.1:50051 -ca-cert ca.crt
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/oauth"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	orchestratorv1 "github.com/sandhub/sandhub/gen/go/sandhub/orchestrator/v1"
)

// fields is what a step saw, printed as its JSON line.
type fields map[string]any

// walk holds the clients and the container the steps share.
type walk struct {
	containers  orchestratorv1.OrchestratorServiceClient
	exec        execv1.ExecServiceClient
	containerID string
}

func main() {
	hub := flag.String("hub", "", "the Hub's host:port")
	caCert := flag.String("ca-cert", "", "PEM file of the CA that signed the Hub's certificate")
	flag.Parse()
	key := os.Getenv("SANDHUB_API_KEY")
	if *hub == "" || *caCert == "" || key == "" {
		fmt.Fprintln(os.Stderr, "usage: SANDHUB_API_KEY=<key> interop -hub host:port -ca-cert ca.pem")
		os.Exit(2)
	}
	conn, err := dial(*hub, *caCert, key)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(2)
	}
	defer conn.Close()
	w := &walk{
		containers: orchestratorv1.NewOrchestratorServiceClient(conn),
		exec:       execv1.NewExecServiceClient(conn),
	}
	if !w.steps() {
		os.Exit(1)
	}
}

// dial opens a TLS channel whose every call carries `authorization: Bearer
// <key>`, the way any grpc-go user sends a token.
func dial(target, caFile, key string) (*grpc.ClientConn, error) {
	tls, err := credentials.NewClientTLSFromFile(caFile, "")
	if err != nil {
		return nil, err
	}
	token := oauth.TokenSource{TokenSource: oauth2.StaticTokenSource(&oauth2.Token{AccessToken: key})}
	return grpc.NewClient(target, grpc.WithTransportCredentials(tls), grpc.WithPerRPCCredentials(token))
}

// steps runs the walk in order. A step that fails is reported and the walk
// goes on (more of the contract is checked in one run), except when there
// is no container to go on with; the container is deleted in any case.
func (w *walk) steps() bool {
	ok := run("create", w.create)
	if !ok {
		return false
	}
	for _, s := range []struct {
		name string
		fn   func(context.Context) (fields, error)
	}{
		{"put_raw", w.putRaw},
		{"put_tar", w.putTar},
		{"run", w.run},
		{"exec_stdin_eof", w.execStdinEOF},
		{"exec_pty", w.execPty},
		{"process", w.process},
		{"get_raw", w.getRaw},
		{"get_tar", w.getTar},
		{"error_not_found", w.errorNotFound},
		{"error_process_not_found", w.errorProcessNotFound},
		{"error_invalid_field", w.errorInvalidField},
	} {
		ok = run(s.name, s.fn) && ok
	}
	return run("delete", w.delete) && ok
}

// run runs one step under its own deadline and prints its line: what it saw,
// and "error" when that is not what the contract says.
func run(name string, fn func(context.Context) (fields, error)) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	saw, err := fn(ctx)
	if saw == nil {
		saw = fields{}
	}
	line := fields{"step": name}
	for k, v := range saw {
		line[k] = v
	}
	if err != nil {
		line["error"] = err.Error()
	}
	out, jerr := json.Marshal(line)
	if jerr != nil {
		out = []byte(fmt.Sprintf(`{"step":%q,"error":%q}`, name, jerr.Error()))
	}
	fmt.Println(string(out))
	return err == nil && jerr == nil
}

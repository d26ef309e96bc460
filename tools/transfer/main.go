// Command transfer is the Go client side of the transfer benches (`sandhub
// bench agent-relay`, `sandhub bench exec`): PutFiles then GetFiles of one
// file through a Hub, as a caller whose stubs are generated in Go would make
// them. The Python client (sandhub.bench.upload_client) spends about as much
// CPU per byte as the Hub does; this one shows the Hub with a cheaper caller.
// Prints one JSON line: MB/s per repetition, as upload_client does.
//
//	transfer ADDRESS MIB REPEATS CONTAINER API_KEY DOWNLOAD_PATH
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	execv1 "github.com/sandhub/sandhub/gen/go/sandhub/exec/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

const chunk = 1 << 20

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "transfer:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 6 {
		return errors.New("usage: transfer ADDRESS MIB REPEATS CONTAINER API_KEY DOWNLOAD_PATH")
	}
	address, container, key, path := args[0], args[3], args[4], args[5]
	mib, err := strconv.Atoi(args[1])
	if err != nil || mib <= 0 {
		return fmt.Errorf("MIB: %q", args[1])
	}
	repeats, err := strconv.Atoi(args[2])
	if err != nil || repeats <= 0 {
		return fmt.Errorf("REPEATS: %q", args[2])
	}
	// Loopback only, as the benches run it: plaintext is the Hub's development mode.
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8<<20)))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := execv1.NewExecServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
	payload := make([]byte, mib*chunk)
	for i := range payload {
		payload[i] = byte(i)
	}
	rates := map[string][]float64{}
	timed := func(name string, f func() error) error {
		start := time.Now()
		if err := f(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		rates[name] = append(rates[name], float64(len(payload))/1e6/time.Since(start).Seconds())
		return nil
	}
	for range repeats {
		if err := timed("go_put_files", func() error { return put(ctx, client, container, payload) }); err != nil {
			return err
		}
		if err := timed("go_get_files", func() error { return get(ctx, client, container, path, len(payload)) }); err != nil {
			return err
		}
	}
	return json.NewEncoder(os.Stdout).Encode(rates)
}

func put(ctx context.Context, client execv1.ExecServiceClient, container string, payload []byte) error {
	s, err := client.PutFiles(ctx)
	if err != nil {
		return err
	}
	first := []*execv1.PutFilesRequest{
		{Msg: &execv1.PutFilesRequest_Start{Start: &execv1.PutFilesStart{ContainerId: container}}},
		{Msg: &execv1.PutFilesRequest_File{File: &execv1.FileHeader{Path: "blob.bin", Size: int64(len(payload))}}},
	}
	for _, m := range first {
		if err := s.Send(m); err != nil {
			return err
		}
	}
	for i := 0; i < len(payload); i += chunk {
		if err := s.Send(&execv1.PutFilesRequest{Msg: &execv1.PutFilesRequest_Data{Data: payload[i:min(i+chunk, len(payload))]}}); err != nil {
			break // the call ended: CloseAndRecv says how
		}
	}
	_, err = s.CloseAndRecv()
	return err
}

func get(ctx context.Context, client execv1.ExecServiceClient, container, path string, want int) error {
	s, err := client.GetFiles(ctx, &execv1.GetFilesRequest{ContainerId: container, Path: path})
	if err != nil {
		return err
	}
	got := 0
	for {
		r, err := s.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		got += len(r.GetData())
	}
	if got != want {
		return fmt.Errorf("got %d bytes back, want %d", got, want)
	}
	return nil
}

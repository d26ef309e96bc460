package ring

import (
	"bytes"
	"path/filepath"
	"testing"
)

func TestRingKeepsTheLastCapacityBytes(t *testing.T) {
	r, err := Create(filepath.Join(t.TempDir(), "r"), 10)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = r.Write([]byte("0123456"))
	at, data, dropped, _ := r.Read(2, 100)
	if at != 2 || string(data) != "23456" || dropped {
		t.Fatalf("%d %q %v", at, data, dropped)
	}
	changed := r.Changed()
	_, _ = r.Write([]byte("789abcdef")) // wraps: 16 bytes written, 6..15 kept
	select {
	case <-changed:
	default:
		t.Fatal("Changed not closed by a write")
	}
	total, first := r.State()
	if total != 16 || first != 6 {
		t.Fatalf("total %d first %d", total, first)
	}
	at, data, dropped, _ = r.Read(3, 100)
	if at != 6 || string(data) != "6789abcdef" || !dropped {
		t.Fatalf("%d %q %v", at, data, dropped)
	}
	at, data, _, _ = r.Read(14, 1)
	if at != 14 || string(data) != "e" {
		t.Fatalf("%d %q", at, data)
	}
	at, data, dropped, _ = r.Read(16, 100) // nothing newer yet
	if at != 16 || len(data) != 0 || dropped {
		t.Fatalf("%d %q %v", at, data, dropped)
	}
	// One write larger than the ring keeps only its tail.
	big := bytes.Repeat([]byte("z"), 25)
	big[24] = '!'
	_, _ = r.Write(big)
	at, data, _, _ = r.Read(0, 100)
	if at != 31 || string(data) != "zzzzzzzzz!" {
		t.Fatalf("%d %q", at, data)
	}
}

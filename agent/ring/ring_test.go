package ring

import (
	"bytes"
	"os"
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

// A write the file cannot take (a full disk) still counts: the offsets go
// on, and readers skip the lost range with dropped set, as for overwritten
// output.
func TestFailedWritesAreRecordedAsLost(t *testing.T) {
	path := filepath.Join(t.TempDir(), "r")
	r, err := Create(path, 100)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = r.Write([]byte("hello"))
	rw := r.f
	ro, err := os.Open(path) // writes fail (EBADF), reads work
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	r.f = ro
	changed := r.Changed()
	if _, err := r.Write([]byte("LOST!!")); err == nil {
		t.Fatal("the failed write reported no error")
	}
	select {
	case <-changed:
	default:
		t.Fatal("a lost write did not wake the readers")
	}
	_, _ = r.Write([]byte("x")) // lost too: one range 5..12
	r.f = rw
	_, _ = r.Write([]byte("world"))
	if total, first := r.State(); total != 17 || first != 0 {
		t.Fatalf("total %d first %d", total, first)
	}
	at, data, dropped, _ := r.Read(0, 100)
	if at != 0 || string(data) != "hello" || dropped {
		t.Fatalf("%d %q %v", at, data, dropped)
	}
	at, data, dropped, _ = r.Read(5, 100)
	if at != 12 || string(data) != "world" || !dropped {
		t.Fatalf("%d %q %v", at, data, dropped)
	}
	if len(r.lost) != 1 {
		t.Fatalf("lost ranges %v", r.lost)
	}
	// Once the ring has moved past a lost range, it is forgotten.
	_, _ = r.Write(bytes.Repeat([]byte("y"), 100))
	if _, first := r.State(); first != 17 || len(r.lost) != 0 {
		t.Fatalf("first %d lost %v", first, r.lost)
	}
}

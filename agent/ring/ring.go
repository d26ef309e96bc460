// Package ring keeps a background process's output in a file of fixed size.
//
// The file lives in the agent's state directory inside the container, so a
// process that prints forever costs its own container a fixed amount of disk
// (or memory, on a tmpfs), never the host. The byte at absolute offset o
// (counted from the stream's first byte) is at o % capacity; the counters live
// in memory, because the writer and every reader are in this process.
package ring

import (
	"os"
	"sync"
)

// Ring is one stream's buffer. Safe for one writer and any readers.
type Ring struct {
	mu       sync.Mutex
	f        *os.File
	capacity int64
	total    int64
	changed  chan struct{}
}

// Create makes a new ring file at path (which must not exist).
func Create(path string, capacity int64) (*Ring, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return &Ring{f: f, capacity: capacity, changed: make(chan struct{})}, nil
}

// Write appends p, overwriting the oldest bytes when full. Only the last
// capacity bytes of p can be kept, so only those are written.
func (r *Ring) Write(p []byte) (int, error) {
	n := len(p)
	r.mu.Lock()
	defer r.mu.Unlock()
	end := r.total + int64(n)
	tail := p
	if int64(len(tail)) > r.capacity {
		tail = tail[int64(len(tail))-r.capacity:]
	}
	off := end - int64(len(tail))
	for len(tail) > 0 {
		pos := off % r.capacity
		k := min(int64(len(tail)), r.capacity-pos)
		if _, err := r.f.WriteAt(tail[:k], pos); err != nil {
			return 0, err
		}
		tail, off = tail[k:], off+k
	}
	r.total = end
	close(r.changed)
	r.changed = make(chan struct{})
	return n, nil
}

// State returns the bytes written so far (the next offset) and the oldest
// offset still kept.
func (r *Ring) State() (total, first int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total, max(0, r.total-r.capacity)
}

// Changed is closed at the next Write (or at Close).
func (r *Ring) Changed() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed
}

// Read returns up to max bytes from offset on, or from the oldest kept byte
// when offset was dropped (dropped is then true). Empty when nothing newer
// exists yet.
func (r *Ring) Read(offset int64, maxBytes int) (at int64, data []byte, dropped bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	first := max(0, r.total-r.capacity)
	start := max(offset, first)
	end := min(r.total, start+int64(maxBytes))
	if start >= end {
		return min(offset, r.total), nil, false, nil
	}
	data = make([]byte, end-start)
	for pos := start; pos < end; {
		at := pos % r.capacity
		k := min(end-pos, r.capacity-at)
		if _, err := r.f.ReadAt(data[pos-start:pos-start+k], at); err != nil {
			return 0, nil, false, err
		}
		pos += k
	}
	return start, data, start > offset, nil
}

// Remove closes the file and deletes it (when its process is evicted).
func (r *Ring) Remove() {
	r.mu.Lock()
	defer r.mu.Unlock()
	_ = os.Remove(r.f.Name())
	_ = r.f.Close()
	close(r.changed)
	r.changed = make(chan struct{})
}

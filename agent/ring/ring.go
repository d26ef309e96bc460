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
	// lost are the ranges [start, end) a failed write could not keep (the
	// container's disk was full), oldest first, never adjacent: a reader
	// skips them and is told output was dropped, as for what was overwritten.
	lost    []span
	changed chan struct{}
}

type span struct{ start, end int64 }

// maxLost bounds the lost ranges remembered; past it the two oldest are
// joined (the bytes between them count as lost too).
const maxLost = 64

// Create makes a new ring file at path (which must not exist).
func Create(path string, capacity int64) (*Ring, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return &Ring{f: f, capacity: capacity, changed: make(chan struct{})}, nil
}

// Write appends p, overwriting the oldest bytes when full. Only the last
// capacity bytes of p can be kept, so only those are written. When the file
// cannot be written (a full disk), p still counts: the offsets go on, and
// p's range is recorded as lost so readers learn of the gap. (A partial
// write only overwrote slots of bytes older than the ring keeps anyway.)
func (r *Ring) Write(p []byte) (int, error) {
	n := len(p)
	r.mu.Lock()
	defer r.mu.Unlock()
	begin, end := r.total, r.total+int64(n)
	tail := p
	if int64(len(tail)) > r.capacity {
		tail = tail[int64(len(tail))-r.capacity:]
	}
	off := end - int64(len(tail))
	var err error
	for len(tail) > 0 {
		pos := off % r.capacity
		k := min(int64(len(tail)), r.capacity-pos)
		if _, err = r.f.WriteAt(tail[:k], pos); err != nil {
			r.lose(begin, end)
			break
		}
		tail, off = tail[k:], off+k
	}
	r.total = end
	for len(r.lost) > 0 && r.lost[0].end <= end-r.capacity {
		r.lost = r.lost[1:] // out of the ring's reach
	}
	close(r.changed)
	r.changed = make(chan struct{})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// lose records [start, end) as lost (r.mu held).
func (r *Ring) lose(start, end int64) {
	if k := len(r.lost); k > 0 && r.lost[k-1].end == start {
		r.lost[k-1].end = end
	} else {
		r.lost = append(r.lost, span{start, end})
	}
	if len(r.lost) > maxLost {
		r.lost[1].start = r.lost[0].start
		r.lost = r.lost[1:]
	}
}

// kept is the first offset >= o that holds a kept byte, and the end of the
// kept run that starts there (r.mu held).
func (r *Ring) kept(o int64) (start, runEnd int64) {
	start, runEnd = max(o, r.total-r.capacity, 0), r.total
	for _, g := range r.lost {
		if start >= g.start && start < g.end {
			start = g.end
		} else if g.start > start {
			runEnd = g.start
			break
		}
	}
	return min(start, r.total), runEnd
}

// State returns the bytes written so far (the next offset) and the oldest
// offset still kept.
func (r *Ring) State() (total, first int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	first, _ = r.kept(0)
	return r.total, first
}

// Changed is closed at the next Write (or at Close).
func (r *Ring) Changed() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed
}

// Read returns up to max bytes from offset on, or from the next kept byte
// when offset was dropped (overwritten, or lost to a failed write: dropped
// is then true). A read stops at a lost range. Empty when nothing newer
// exists yet.
func (r *Ring) Read(offset int64, maxBytes int) (at int64, data []byte, dropped bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	start, runEnd := r.kept(offset)
	end := min(runEnd, start+int64(maxBytes))
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

package server

import (
	"os"
	"sync/atomic"
	"time"
)

// chunkBytes is the largest output message (the contract's 64 KiB).
const chunkBytes = 64 << 10

// pump reads f until EOF and hands each read to emit (which may block: that
// is the backpressure that stops a command whose reader is slow). Once exited
// is closed it keeps reading, so what the command left in the pipe is never
// thrown away, and stops when the pipe stays empty for idle (a process the
// command left behind holds it open: nothing was pending) or, if something
// keeps writing, after maxAfter; then cut is true (bytes may be left unread).
func pump(f *os.File, exited <-chan struct{}, idle, maxAfter time.Duration, emit func([]byte)) (cut bool) {
	var exitedAt atomic.Int64
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-exited:
			exitedAt.Store(time.Now().UnixNano())
			_ = f.SetReadDeadline(time.Now().Add(idle))
		case <-stop:
		}
	}()
	for {
		buf := make([]byte, chunkBytes)
		n, err := f.Read(buf)
		if n > 0 {
			emit(buf[:n])
		}
		if at := exitedAt.Load(); at != 0 {
			if err == nil && time.Since(time.Unix(0, at)) > maxAfter {
				return true
			}
			_ = f.SetReadDeadline(time.Now().Add(idle))
		}
		if err != nil {
			// EOF (pipe), EIO (terminal closed), deadline (idle after exit),
			// or our own Close: in every case nothing more is pending.
			return false
		}
	}
}

// capped keeps the first limit bytes written to it and counts the rest.
type capped struct {
	data      []byte
	limit     int
	truncated bool
}

func (c *capped) add(p []byte) {
	room := c.limit - len(c.data)
	if len(p) > room {
		c.truncated = true
		p = p[:max(room, 0)]
	}
	c.data = append(c.data, p...)
}

// A backend on the stock grpc-go server (Debian's grpc-go 1.33) with its
// default settings: helloworld.Greeter/SayHello answering
// "Hello <name> from <addr>" and the stock health server
// (google.golang.org/grpc/health), whole server SERVING. Nothing about
// keep-alive is configured, so the server enforces grpc-go's defaults
// (EnforcementPolicy{MinTime: 5m, PermitWithoutStream: false}, GOAWAY
// too_many_pings after two strikes), which is the point.
//
// Prints "LISTENING <port>" once serving, and "CONN <n> <remote>" for every
// connection it accepts, so a test can count reconnects from the backend's
// side. SIGTERM sets NOT_SERVING, waits -grace, then stops gracefully.
// -max-streams caps concurrent streams per connection (the server's
// MaxConcurrentStreams; 0 keeps grpc-go's default) and -delay holds every
// answer that long: together, a backend that callers can outrun.
// -fail-code answers every call with that gRPC status code (health stays
// SERVING: a backend whose checks pass while its calls fail); with
// -fail-rate, only that fraction of calls, at random (a gray failure).
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"lbtest/greeter"
)

type countingListener struct {
	net.Listener
	n int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		fmt.Printf("CONN %d %s\n", atomic.AddInt64(&l.n, 1), c.RemoteAddr())
	}
	return c, err
}

func main() {
	port := flag.Int("port", 0, "port on 127.0.0.1 (0: any free port)")
	grace := flag.Duration("grace", time.Second, "NOT_SERVING this long before stopping")
	maxStreams := flag.Uint("max-streams", 0, "concurrent streams per connection (0: grpc-go's default)")
	delay := flag.Duration("delay", 0, "hold every answer this long")
	failCode := flag.Int("fail-code", 0, "answer every call with this status code (0: answer normally)")
	failRate := flag.Float64("fail-rate", 1, "with -fail-code: the fraction of calls that fail, at random")
	flag.Parse()
	// Go before 1.20 seeds math/rand with 1: every backend would fail the
	// same calls of its sequence, the same in every run.
	rand.Seed(time.Now().UnixNano() ^ int64(os.Getpid()))

	lis, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	addr := lis.Addr().String()
	var opts []grpc.ServerOption
	if *maxStreams > 0 {
		opts = append(opts, grpc.MaxConcurrentStreams(uint32(*maxStreams)))
	}
	s := grpc.NewServer(opts...)
	greeter.Register(s, func(_ context.Context, name string) (string, error) {
		time.Sleep(*delay)
		if *failCode != 0 && rand.Float64() < *failRate {
			return "", status.Errorf(codes.Code(*failCode), "failing on purpose (-fail-code) at %s", addr)
		}
		return fmt.Sprintf("Hello %s from %s", name, addr), nil
	})
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(s, hs)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
		time.Sleep(*grace)
		s.GracefulStop()
	}()
	fmt.Printf("LISTENING %d\n", lis.Addr().(*net.TCPAddr).Port)
	if err := s.Serve(&countingListener{Listener: lis}); err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	}
}

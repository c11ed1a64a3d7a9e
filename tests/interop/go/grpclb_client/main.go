// A stock grpc-go grpclb client (Debian's grpc-go 1.33): the balancer
// address comes from the resolver state (grpclbstate), the grpclb policy
// from the service config, and everything else is grpc-go's default. It
// calls helloworld.Greeter/SayHello every -interval for -duration and then
// prints a JSON summary on stdout: calls per backend, failed calls.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	_ "google.golang.org/grpc/balancer/grpclb"
	grpclbstate "google.golang.org/grpc/balancer/grpclb/state"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"lbtest/greeter"
)

type summary struct {
	Calls      int            `json:"calls"`
	PerBackend map[string]int `json:"per_backend"`
	Failures   []string       `json:"failures"`
}

func main() {
	lb := flag.String("lb", "", "the LB's host:port")
	name := flag.String("service", "greeter", "the name asked of the LB (the dial target's authority)")
	duration := flag.Duration("duration", 10*time.Second, "how long to call")
	interval := flag.Duration("interval", 50*time.Millisecond, "time between calls")
	ready := flag.Duration("ready-timeout", 20*time.Second, "time allowed for the first call")
	flag.Parse()

	lbAddr, service := *lb, *name
	// readme:begin grpc-go (README.md "Stock gRPC clients" shows this region)
	// The balancer's address reaches the grpclb policy in the resolver
	// state (grpc-go does no SRV lookups of its own); the policy is chosen
	// by the service config. The target's authority is the name the LB maps.
	r := manual.NewBuilderWithScheme("lb")
	r.InitialState(grpclbstate.Set(resolver.State{}, &grpclbstate.State{
		BalancerAddresses: []resolver.Address{{Addr: lbAddr, ServerName: "lb"}},
	}))
	cc, err := grpc.Dial("lb:///"+service,
		grpc.WithInsecure(), // or grpc.WithTransportCredentials(...)
		grpc.WithResolvers(r),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"grpclb":{}}]}`),
	)
	// readme:end
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer cc.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *ready)
	_, err = greeter.SayHello(ctx, cc, "warmup", grpc.WaitForReady(true))
	cancel()
	if err != nil {
		out, _ := json.Marshal(map[string]string{"error": "never became ready: " + err.Error()})
		fmt.Println(string(out))
		os.Exit(1)
	}

	s := summary{PerBackend: map[string]int{}, Failures: []string{}}
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	end := time.Now().Add(*duration)
	for i := 0; time.Now().Before(end); i++ {
		<-tick.C
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		reply, err := greeter.SayHello(ctx, cc, fmt.Sprintf("call-%d", i))
		cancel()
		s.Calls++
		if err != nil {
			s.Failures = append(s.Failures, fmt.Sprintf("%s %v", time.Now().Format(time.RFC3339Nano), err))
			continue
		}
		parts := strings.Split(reply, " from ")
		s.PerBackend[parts[len(parts)-1]]++
	}
	out, _ := json.Marshal(s)
	fmt.Println(string(out))
}

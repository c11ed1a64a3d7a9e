// Package greeter describes helloworld.Greeter/SayHello for the stock grpc-go
// peers of the interop tests. HelloRequest{string name = 1} and
// HelloReply{string message = 1} have the wire form of
// google.protobuf.StringValue, so the well-known wrapper type stands in for
// generated code (Debian's grpc-go ships no helloworld package).
package greeter

import (
	"context"

	"github.com/golang/protobuf/ptypes/wrappers"
	"google.golang.org/grpc"
)

// Method is the full method name of SayHello.
const Method = "/helloworld.Greeter/SayHello"

// Handler answers one SayHello.
type Handler func(ctx context.Context, name string) (string, error)

// Register serves SayHello on s with h.
func Register(s *grpc.Server, h Handler) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "helloworld.Greeter",
		HandlerType: (*interface{})(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: "SayHello",
			Handler: func(_ interface{}, ctx context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
				in := new(wrappers.StringValue)
				if err := dec(in); err != nil {
					return nil, err
				}
				out, err := h(ctx, in.Value)
				if err != nil {
					return nil, err
				}
				return &wrappers.StringValue{Value: out}, nil
			},
		}},
		Streams:  []grpc.StreamDesc{},
		Metadata: "helloworld.proto",
	}, struct{}{})
}

// SayHello calls SayHello on cc.
func SayHello(ctx context.Context, cc *grpc.ClientConn, name string, opts ...grpc.CallOption) (string, error) {
	out := new(wrappers.StringValue)
	if err := cc.Invoke(ctx, Method, &wrappers.StringValue{Value: name}, out, opts...); err != nil {
		return "", err
	}
	return out.Value, nil
}

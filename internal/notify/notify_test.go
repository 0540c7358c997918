package notify

import "testing"

func TestHubCoalesces(t *testing.T) {
	var h Hub
	a, cancelA := h.Subscribe(true)
	b, cancelB := h.Subscribe(false)
	defer cancelA()
	<-a // primed
	select {
	case <-b:
		t.Fatal("unprimed subscriber signalled before any change")
	default:
	}
	h.Notify()
	h.Notify()
	<-a
	<-b
	select {
	case <-a:
		t.Fatal("two changes gave two signals")
	default:
	}
	cancelB()
	h.Notify()
	select {
	case <-b:
		t.Fatal("signal after the subscription ended")
	default:
	}
	<-a
}

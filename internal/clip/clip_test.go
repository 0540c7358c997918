package clip

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

func TestString(t *testing.T) {
	require.Equal(t, "short", String("short", 10))
	long := strings.Repeat("é", 100) // 200 bytes
	got := String(long, 50)
	require.LessOrEqual(t, len(got), 50)
	require.True(t, utf8.ValidString(got), "cut on a rune boundary")
	require.True(t, strings.HasSuffix(got, "… (150 more bytes)"), got)
}

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;

/**
 * The HTTP exchange of groovy/zeus_segment_current_image.groovy, in plain Java (JDK 11+, no libraries),
 * so tests can check that a JVM client talks to `zeus serve` the way QuPath does.
 *
 * Usage: java ZeusClient.java URL SLIDE [REGION_JSON]   (the token comes from the environment variable ZEUS_TOKEN)
 *
 * Sends POST URL with {"slide": SLIDE, "region": REGION_JSON} and "Authorization: Bearer <token>", using
 * java.net.http.HttpClient with the same settings as the Groovy script, and prints one fact per line:
 * status=CODE, then for a FeatureCollection type=..., features=N, classes=A,B and vertices=N; for an error
 * answer error=MESSAGE.
 */
public class ZeusClient {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: java ZeusClient.java URL SLIDE [REGION_JSON]");
            System.exit(2);
        }
        StringBuilder body = new StringBuilder("{\"slide\":").append(Json.quote(args[1]));
        if (args.length > 2)
            body.append(",\"region\":").append(args[2]);
        body.append('}');

        String token = System.getenv("ZEUS_TOKEN");
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        HttpRequest.Builder builder = HttpRequest.newBuilder(URI.create(args[0]))
                .timeout(Duration.ofMinutes(5))
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(body.toString(), StandardCharsets.UTF_8));
        if (token != null && !token.isEmpty())
            builder.header("Authorization", "Bearer " + token);
        HttpResponse<String> response = client.send(builder.build(), HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8));

        System.out.println("status=" + response.statusCode());
        Object answer = new Json(response.body()).document();
        if (!(answer instanceof Map)) {
            System.out.println("error=answer is not a JSON object");
            return;
        }
        Map<?, ?> object = (Map<?, ?>) answer;
        if (object.containsKey("error")) {
            System.out.println("error=" + object.get("error"));
            return;
        }
        System.out.println("type=" + object.get("type"));
        List<?> features = (List<?>) object.get("features");
        System.out.println("features=" + features.size());
        TreeSet<String> classes = new TreeSet<>();
        long vertices = 0;
        for (Object f : features) {
            Map<?, ?> feature = (Map<?, ?>) f;
            Map<?, ?> props = (Map<?, ?>) feature.get("properties");
            Map<?, ?> classification = (Map<?, ?>) props.get("classification");
            classes.add(String.valueOf(classification.get("name")));
            vertices += countPositions(((Map<?, ?>) feature.get("geometry")).get("coordinates"));
        }
        System.out.println("classes=" + String.join(",", classes));
        System.out.println("vertices=" + vertices);
    }

    /** Number of [x, y] positions in a GeoJSON coordinates array of any depth. */
    static long countPositions(Object coordinates) {
        List<?> list = (List<?>) coordinates;
        if (!list.isEmpty() && list.get(0) instanceof Number)
            return 1;
        long n = 0;
        for (Object item : list)
            n += countPositions(item);
        return n;
    }
}

/** A small strict JSON reader (objects -> LinkedHashMap, arrays -> ArrayList, numbers -> Double). */
class Json {
    private final String s;
    private int i;

    Json(String text) {
        s = text;
    }

    static String quote(String text) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            if (c == '"' || c == '\\')
                b.append('\\').append(c);
            else if (c < 0x20)
                b.append(String.format("\\u%04x", (int) c));
            else
                b.append(c);
        }
        return b.append('"').toString();
    }

    Object document() {
        Object v = value();
        skip();
        if (i != s.length())
            throw error("trailing characters");
        return v;
    }

    private Object value() {
        skip();
        if (i >= s.length())
            throw error("unexpected end");
        char c = s.charAt(i);
        if (c == '{')
            return object();
        if (c == '[')
            return array();
        if (c == '"')
            return string();
        if (s.startsWith("true", i)) { i += 4; return Boolean.TRUE; }
        if (s.startsWith("false", i)) { i += 5; return Boolean.FALSE; }
        if (s.startsWith("null", i)) { i += 4; return null; }
        return number();
    }

    private Map<String, Object> object() {
        Map<String, Object> map = new LinkedHashMap<>();
        i++;
        skip();
        if (peek() == '}') { i++; return map; }
        while (true) {
            skip();
            if (peek() != '"')
                throw error("expected a key");
            String key = string();
            skip();
            expect(':');
            map.put(key, value());
            skip();
            if (peek() == ',') { i++; continue; }
            expect('}');
            return map;
        }
    }

    private List<Object> array() {
        List<Object> list = new ArrayList<>();
        i++;
        skip();
        if (peek() == ']') { i++; return list; }
        while (true) {
            list.add(value());
            skip();
            if (peek() == ',') { i++; continue; }
            expect(']');
            return list;
        }
    }

    private String string() {
        StringBuilder b = new StringBuilder();
        i++;
        while (true) {
            if (i >= s.length())
                throw error("unterminated string");
            char c = s.charAt(i++);
            if (c == '"')
                return b.toString();
            if (c != '\\') { b.append(c); continue; }
            char e = s.charAt(i++);
            switch (e) {
                case 'n': b.append('\n'); break;
                case 't': b.append('\t'); break;
                case 'r': b.append('\r'); break;
                case 'b': b.append('\b'); break;
                case 'f': b.append('\f'); break;
                case 'u': b.append((char) Integer.parseInt(s.substring(i, i + 4), 16)); i += 4; break;
                default: b.append(e);
            }
        }
    }

    private Double number() {
        int start = i;
        while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0)
            i++;
        if (start == i)
            throw error("unexpected character");
        return Double.valueOf(s.substring(start, i));
    }

    private void skip() {
        while (i < s.length() && Character.isWhitespace(s.charAt(i)))
            i++;
    }

    private char peek() {
        if (i >= s.length())
            throw error("unexpected end");
        return s.charAt(i);
    }

    private void expect(char c) {
        if (peek() != c)
            throw error("expected '" + c + "'");
        i++;
    }

    private IllegalArgumentException error(String what) {
        return new IllegalArgumentException("bad JSON at " + i + ": " + what);
    }
}

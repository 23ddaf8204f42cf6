package zeus.qupath.extension;

import java.io.IOException;
import java.net.ConnectException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpConnectTimeoutException;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.HttpTimeoutException;
import java.nio.channels.UnresolvedAddressException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CancellationException;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;

/**
 * The HTTP client of the local ZEUS service ({@code zeus serve}): the connection check ({@code GET /health}, then
 * the {@code GET /version} handshake) and {@code POST /segment}. Plain JDK ({@code java.net.http}) and Gson; no
 * QuPath API. Every failure becomes one sentence that says what is wrong and what to do.
 */
public final class ZeusClient {

    /** The service API this extension speaks; the service answers its own as {@code api} in GET /version. */
    public static final int API_VERSION = ExtensionInfo.apiVersion();

    private static final Duration CHECK_TIMEOUT = Duration.ofSeconds(10);

    private final URI base;
    private final String token;
    private final HttpClient http;

    /** What the connection check found: ok, one message, and the service's capabilities when it answered. */
    public static final class Check {
        public final boolean ok;
        public final String message;
        public final List<String> capabilities;
        public final String serviceVersion;

        Check(boolean ok, String message, List<String> capabilities, String serviceVersion) {
            this.ok = ok;
            this.message = message;
            this.capabilities = capabilities;
            this.serviceVersion = serviceVersion;
        }

        public boolean offers(String capability) {
            return capabilities.contains(capability);
        }
    }

    /** A refusal or failure of the service, as one sentence for the annotator. */
    public static final class ServiceException extends Exception {
        private static final long serialVersionUID = 1L;
        /** The HTTP status of a refusal (0: no answer, or not from the service). */
        public final int status;
        /** The service's own {"error": ...} line of a refusal (null: no answer). */
        public final String error;

        public ServiceException(String message) {
            this(message, 0, null);
        }

        public ServiceException(String message, int status, String error) {
            super(message);
            this.status = status;
            this.error = error;
        }
    }

    /**
     * @param serviceUrl the service's address, e.g. {@code http://127.0.0.1:8765} (a trailing /segment is dropped)
     * @param token the token {@code zeus serve} printed; blank: none
     */
    public ZeusClient(String serviceUrl, String token) throws ServiceException {
        this.base = baseUri(serviceUrl);
        this.token = token == null ? "" : token.trim();
        this.http = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).connectTimeout(CHECK_TIMEOUT).build();
    }

    /** The service's base URI, or a message saying why the text is not one. */
    static URI baseUri(String serviceUrl) throws ServiceException {
        String text = serviceUrl == null ? "" : serviceUrl.trim();
        while (text.endsWith("/"))
            text = text.substring(0, text.length() - 1);
        for (String endpoint : new String[] {"/segment", "/version", "/health"}) {
            if (text.endsWith(endpoint))
                text = text.substring(0, text.length() - endpoint.length());
        }
        if (text.isEmpty())
            throw new ServiceException("No service URL is set: enter the address zeus serve printed, "
                    + "e.g. http://127.0.0.1:8765 (Extensions > ZEUS > Settings).");
        URI uri;
        try {
            uri = URI.create(text);
        } catch (IllegalArgumentException e) {
            throw new ServiceException("The service URL '" + text + "' is not a valid address: " + e.getMessage());
        }
        String scheme = uri.getScheme();
        if (scheme == null || !(scheme.equalsIgnoreCase("http") || scheme.equalsIgnoreCase("https")) || uri.getHost() == null)
            throw new ServiceException("The service URL '" + text + "' is not an http:// address with a host, "
                    + "e.g. http://127.0.0.1:8765.");
        return uri;
    }

    public URI getBase() {
        return base;
    }

    private HttpRequest.Builder request(String path, Duration timeout) {
        HttpRequest.Builder builder = HttpRequest.newBuilder(URI.create(base.toString() + path)).timeout(timeout);
        if (!token.isEmpty())
            builder.header("Authorization", "Bearer " + token);
        return builder;
    }

    private String where() {
        return base.toString();
    }

    /** One sentence for a failure to reach the service at all. */
    String unreachable(Throwable e) {
        Throwable cause = e;
        while ((cause instanceof ExecutionException || cause instanceof java.util.concurrent.CompletionException)
                && cause.getCause() != null)
            cause = cause.getCause();
        if (cause instanceof HttpConnectTimeoutException)
            return "No answer from " + where() + " within " + CHECK_TIMEOUT.getSeconds()
                    + " s (connection timed out): is the host right, and is a firewall in the way?";
        if (cause instanceof ConnectException) {
            String detail = cause.getMessage() == null ? "" : cause.getMessage();
            if (cause.getCause() instanceof UnresolvedAddressException || detail.contains("Unresolved"))
                return "The host of " + where() + " is not known: check the service URL in Extensions > ZEUS > Settings.";
            return "The ZEUS service is not running at " + where() + " (connection refused). Start it on this computer "
                    + "with: zeus serve --root <folder of your slides>, and check the port in Settings.";
        }
        if (cause instanceof UnresolvedAddressException)
            return "The host of " + where() + " is not known: check the service URL in Extensions > ZEUS > Settings.";
        if (cause instanceof HttpTimeoutException)
            return "The ZEUS service at " + where() + " did not answer in time.";
        return "Cannot reach the ZEUS service at " + where() + ": " + cause;
    }

    /** The service's {"error": "..."} line, or the start of the body. */
    static String errorOf(String body) {
        try {
            JsonElement json = JsonParser.parseString(body);
            if (json.isJsonObject() && json.getAsJsonObject().has("error"))
                return json.getAsJsonObject().get("error").getAsString();
        } catch (RuntimeException e) {
            // not JSON
        }
        String text = body == null ? "" : body.strip();
        return text.length() > 200 ? text.substring(0, 200) + "..." : text;
    }

    /** One sentence for an HTTP answer that is not a success. */
    String refused(int status, String body) {
        String error = errorOf(body);
        if (status == 401) {
            if (token.isEmpty())
                return "The service needs a token and none is set: paste the token zeus serve printed into "
                        + "Extensions > ZEUS > Settings (HTTP 401).";
            return "The service refused the token (HTTP 401: wrong token): paste the token zeus serve printed "
                    + "(or the $ZEUS_TOKEN it was started with) into Extensions > ZEUS > Settings.";
        }
        if (status == 403)
            return "The service refused the request (HTTP 403): " + error
                    + (error.contains("folder") || error.contains("root")
                            ? " (start it with zeus serve --root <folder of this slide>)" : "");
        return "The ZEUS service answered with an error (HTTP " + status + "): " + error;
    }

    private HttpResponse<String> send(HttpRequest request) throws ServiceException, InterruptedException {
        try {
            return http.send(request, HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8));
        } catch (IOException e) {
            throw new ServiceException(unreachable(e));
        }
    }

    /** The connection check: is something listening, is it ZEUS, is the token right, do the versions match. */
    public Check check() throws InterruptedException {
        HttpResponse<String> health;
        try {
            health = send(HttpRequest.newBuilder(URI.create(base + "/health")).timeout(CHECK_TIMEOUT).GET().build());
        } catch (ServiceException e) {
            return new Check(false, e.getMessage(), List.of(), null);
        }
        if (health.statusCode() != 200 || !health.body().contains("\"ok\""))
            return new Check(false, "Something answers at " + where() + " but it is not the ZEUS service (GET /health: HTTP "
                    + health.statusCode() + "): check the port in Settings.", List.of(), null);
        HttpResponse<String> version;
        try {
            version = send(request("/version", CHECK_TIMEOUT).GET().build());
        } catch (ServiceException e) {
            return new Check(false, e.getMessage(), List.of(), null);
        }
        if (version.statusCode() != 200)
            return new Check(false, refused(version.statusCode(), version.body()), List.of(), null);
        JsonObject info;
        try {
            info = JsonParser.parseString(version.body()).getAsJsonObject();
        } catch (RuntimeException e) {
            return new Check(false, "The service at " + where() + " answered GET /version with something that is not "
                    + "JSON: it is not a ZEUS service this extension knows.", List.of(), null);
        }
        String serverVersion = info.has("zeus_qupath") ? info.get("zeus_qupath").getAsString() : "unknown";
        List<String> capabilities = new ArrayList<>();
        if (info.has("capabilities") && info.get("capabilities").isJsonArray())
            info.get("capabilities").getAsJsonArray().forEach(c -> capabilities.add(c.getAsString()));
        String mine = "this extension is zeus-qupath " + ExtensionInfo.version() + " (API " + API_VERSION + ")";
        if (!info.has("api"))
            return new Check(false, "Version mismatch: the service is zeus-qupath " + serverVersion + ", older than the "
                    + "version handshake; " + mine + ". Update zeus-qupath where zeus serve runs, or use the extension "
                    + "jar built from the service's version.", capabilities, serverVersion);
        int api = info.get("api").getAsInt();
        if (api != API_VERSION)
            return new Check(false, "Version mismatch: the service is zeus-qupath " + serverVersion + " (API " + api
                    + "); " + mine + ". Use the extension jar of the service's version (make extension in its "
                    + "checkout) or update zeus-qupath so both match.", capabilities, serverVersion);
        String model = "";
        if (info.has("model") && info.get("model").isJsonObject() && info.getAsJsonObject("model").has("model"))
            model = ", model " + info.getAsJsonObject("model").get("model").getAsString();
        return new Check(true, "Connected: zeus-qupath " + serverVersion + " (API " + api + ") at " + where() + model
                + "; offers " + String.join(", ", capabilities) + ".", capabilities, serverVersion);
    }

    /**
     * POST /segment with {@code body}; the answer (QuPath GeoJSON) or a ServiceException with one sentence.
     * Cancelling {@code holder}'s future (set here) abandons the request.
     */
    public String segment(JsonObject body, Duration timeout, CompletableFuture<?>[] holder)
            throws ServiceException, InterruptedException {
        return post("/segment", body, timeout, holder);
    }

    /** POST path with a JSON body; the answer's text on 200. */
    public String post(String path, JsonObject body, Duration timeout, CompletableFuture<?>[] holder)
            throws ServiceException, InterruptedException {
        HttpRequest request = request(path, timeout).header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(body.toString(), StandardCharsets.UTF_8)).build();
        CompletableFuture<HttpResponse<String>> future = http.sendAsync(request,
                HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8));
        if (holder != null)
            holder[0] = future;
        HttpResponse<String> response;
        try {
            response = future.get();
        } catch (CancellationException e) {
            throw new InterruptedException("cancelled");
        } catch (ExecutionException e) {
            if (e.getCause() instanceof HttpTimeoutException && !(e.getCause() instanceof HttpConnectTimeoutException))
                throw new ServiceException("The ZEUS service did not answer within " + timeout.toMinutes() + " minutes.");
            throw new ServiceException(unreachable(e));
        }
        if (response.statusCode() != 200)
            throw new ServiceException(refused(response.statusCode(), response.body()), response.statusCode(),
                    errorOf(response.body()));
        return response.body();
    }
}

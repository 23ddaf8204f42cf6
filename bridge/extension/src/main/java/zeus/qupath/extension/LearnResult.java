package zeus.qupath.extension;

import java.util.ArrayList;
import java.util.List;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;

import javafx.geometry.Insets;
import javafx.scene.Scene;
import javafx.scene.control.Button;
import javafx.scene.control.Label;
import javafx.scene.control.TextArea;
import javafx.scene.layout.VBox;
import javafx.scene.text.Font;
import javafx.stage.Stage;
import javafx.stage.Window;

/**
 * The answer of the service's {@code POST /learn} (written, adapter, message, images, table, notes), and the window
 * that shows it (plain JavaFX): the message, where the adapter went (or why it was not written) and the
 * cross-validation table in a monospace font.
 */
final class LearnResult {

    static final String TITLE = "ZEUS: Learn result";

    final boolean written;
    final String adapter;
    final String message;
    final List<String> images;
    final String table;
    final List<String> notes;

    private LearnResult(boolean written, String adapter, String message, List<String> images, String table,
            List<String> notes) {
        this.written = written;
        this.adapter = adapter;
        this.message = message;
        this.images = images;
        this.table = table;
        this.notes = notes;
    }

    /** The 200 answer's fields; a body that is not the learn answer is a ServiceException. */
    static LearnResult parse(String answer) throws ZeusClient.ServiceException {
        JsonObject json;
        try {
            JsonElement e = JsonParser.parseString(answer);
            if (!e.isJsonObject() || !e.getAsJsonObject().has("written"))
                throw new IllegalStateException("no 'written' field");
            json = e.getAsJsonObject();
            return new LearnResult(json.get("written").getAsBoolean(), string(json, "adapter"), string(json, "message"),
                    strings(json, "images"), string(json, "table"), strings(json, "notes"));
        } catch (RuntimeException e) {
            String text = answer == null ? "" : answer.strip();
            throw new ZeusClient.ServiceException("The ZEUS service's answer to Learn is not what this extension "
                    + "expects (" + e.getMessage() + "): " + (text.length() > 200 ? text.substring(0, 200) + "..." : text)
                    + " -- are the service and the extension the same version? (Settings: connection check)");
        }
    }

    private static String string(JsonObject json, String key) {
        JsonElement e = json.get(key);
        return e == null || e.isJsonNull() ? null : e.getAsString();
    }

    private static List<String> strings(JsonObject json, String key) {
        List<String> out = new ArrayList<>();
        JsonElement e = json.get(key);
        if (e != null && e.isJsonArray()) {
            for (JsonElement item : (JsonArray) e)
                out.add(item.isJsonPrimitive() ? item.getAsString() : item.toString());
        }
        return out;
    }

    /** The first line: what happened to the adapter. */
    String headline() {
        if (written)
            return "Adapter written: " + adapter;
        return "The adapter was not written: it was not better than zero-shot in cross-validation.";
    }

    /** The outcome in a few lines (the progress window and the test events get this). */
    String summary() {
        return headline() + "\n" + (message == null ? "" : message);
    }

    /** The monospace part: the images, the cross-validation table, the notes. */
    String details() {
        StringBuilder sb = new StringBuilder();
        sb.append("Learned from ").append(images.size()).append(" image(s): ").append(String.join(", ", images))
                .append("\n\n");
        sb.append(table == null ? "(no cross-validation table)" : table.stripTrailing()).append("\n");
        if (!notes.isEmpty()) {
            sb.append("\nNotes:\n");
            for (String n : notes)
                sb.append("  ").append(n).append("\n");
        }
        return sb.toString();
    }

    /** Builds and shows the window; call on the JavaFX thread. */
    Stage show(Window owner) {
        Stage stage = new Stage();
        stage.setTitle(TITLE);
        if (owner != null)
            stage.initOwner(owner);
        Label head = new Label(headline());
        head.setId("zeus-learn-headline");
        head.setWrapText(true);
        head.setMaxWidth(680);
        Label said = new Label(message == null ? "" : message);
        said.setId("zeus-learn-message");
        said.setWrapText(true);
        said.setMaxWidth(680);
        TextArea text = new TextArea(details());
        text.setId("zeus-learn-table");
        text.setEditable(false);
        text.setWrapText(false);
        text.setFont(Font.font("Monospaced", 12));
        text.setStyle("-fx-font-family: 'monospace';");  // inline: no theme's stylesheet overrides it
        text.setPrefColumnCount(90);
        text.setPrefRowCount(Math.min(30, (int) details().lines().count() + 1));
        Button close = new Button("Close");
        close.setOnAction(e -> stage.close());
        VBox box = new VBox(10, head, said, text, close);
        box.setPadding(new Insets(12));
        stage.setScene(new Scene(box));
        stage.show();
        return stage;
    }
}

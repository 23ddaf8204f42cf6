package zeus.qupath.extension;

import javafx.application.Platform;
import javafx.geometry.Insets;
import javafx.scene.Scene;
import javafx.scene.control.Button;
import javafx.scene.control.Label;
import javafx.scene.control.ProgressBar;
import javafx.scene.layout.VBox;
import javafx.stage.Stage;
import javafx.stage.Window;

/** A small progress window (plain JavaFX: the same on every QuPath version): message, bar, Cancel then Close. */
final class ZeusProgress {

    private final Stage stage = new Stage();
    private final Label message = new Label();
    private final ProgressBar bar = new ProgressBar(ProgressBar.INDETERMINATE_PROGRESS);
    private final Button button = new Button("Cancel");
    private volatile boolean cancelled;
    private volatile boolean finished;

    /** Built and shown on the JavaFX thread; onCancel runs there when Cancel is pressed. */
    ZeusProgress(Window owner, String title, Runnable onCancel) {
        stage.setTitle("ZEUS: " + title);
        if (owner != null)
            stage.initOwner(owner);
        message.setId("zeus-progress-message");
        message.setWrapText(true);
        message.setMaxWidth(460);
        bar.setPrefWidth(460);
        button.setId("zeus-progress-button");
        button.setOnAction(e -> {
            if (finished) {
                stage.close();
            } else {
                cancelled = true;
                button.setDisable(true);
                message.setText("Cancelling ...");
                onCancel.run();
            }
        });
        VBox box = new VBox(10, message, bar, button);
        box.setPadding(new Insets(12));
        stage.setScene(new Scene(box));
        stage.show();
    }

    boolean isCancelled() {
        return cancelled;
    }

    /** Thread-safe: the message and the fraction done (negative: unknown). */
    void update(String text, double fraction) {
        Platform.runLater(() -> {
            if (!cancelled)
                message.setText(text);
            bar.setProgress(fraction < 0 ? ProgressBar.INDETERMINATE_PROGRESS : fraction);
        });
    }

    /** Thread-safe: whether Cancel may still be pressed (not while results are being added and saved). */
    void cancellable(boolean can) {
        Platform.runLater(() -> button.setDisable(!can || cancelled));
    }

    /** Thread-safe: the outcome; the button becomes Close. */
    void finish(String text) {
        finished = true;
        Platform.runLater(() -> {
            message.setText(text);
            bar.setProgress(1.0);
            button.setText("Close");
            button.setDisable(false);
            stage.sizeToScene();
        });
    }

    Stage getStage() {
        return stage;
    }
}
